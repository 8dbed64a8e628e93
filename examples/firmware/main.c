/*
 * A firmware's use of gncodegen's code: a buffer of 24x24x20 activations (one SSCB observation
 * of the MATLAB example layer, filled here with a deterministic test pattern) is normalized in
 * place, then each group is checked: with scale 1 and offset 0 its mean must be 0 and its
 * variance 1. No second buffer, no heap: the parameters live in flash inside matlab_gn.c.
 */
#include <stddef.h>
#include <stdint.h>

#include "matlab_gn.h"
#include "semihosting.h"

#define NUMEL MATLAB_GN_OBSERVATION_NUMEL
#define GROUP_NUMEL (NUMEL / MATLAB_GN_NUM_GROUPS) /* SSCB column-major: groups are contiguous */

static float activations[NUMEL];

/* A reproducible pattern: per-channel offsets and gains around xorshift noise. */
static void fill(float *x)
{
    uint32_t state = 2463534242u;
    for (size_t i = 0; i < NUMEL; ++i) {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        const size_t channel = i / (NUMEL / MATLAB_GN_NUM_CHANNELS);
        const float noise = (float)(state >> 8) * (1.0f / 16777216.0f) - 0.5f;
        x[i] = 100.0f + 3.0f * (float)channel + (1.0f + 0.1f * (float)channel) * noise;
    }
}

/* Print v with 6 decimals (newlib-nano's printf has no floats, and none is needed). */
static void write_fixed(float v)
{
    char text[24];
    size_t i = sizeof text - 1;
    const int negative = v < 0.0f;
    uint32_t micro = (uint32_t)((negative ? -v : v) * 1e6f + 0.5f);
    text[i] = '\0';
    for (int digit = 0; digit < 7 || micro != 0u; ++digit) {
        if (digit == 6) {
            text[--i] = '.';
        }
        text[--i] = (char)('0' + micro % 10u);
        micro /= 10u;
    }
    text[--i] = negative ? '-' : '+';
    semihosting_write(&text[i]);
}

int main(void)
{
    fill(activations);
    if (matlab_gn_predict(activations, activations, 1u) != MATLAB_GN_OK) {
        semihosting_write("matlab_gn_predict failed\n");
        return 1;
    }
    int failed = 0;
    for (size_t g = 0; g < MATLAB_GN_NUM_GROUPS; ++g) {
        const float *y = &activations[g * GROUP_NUMEL];
        float sum = 0.0f;
        float sum_sq = 0.0f;
        for (size_t i = 0; i < GROUP_NUMEL; ++i) {
            sum += y[i];
            sum_sq += y[i] * y[i];
        }
        const float mean = sum / (float)GROUP_NUMEL;
        const float var = sum_sq / (float)GROUP_NUMEL - mean * mean;
        const int ok = mean > -1e-4f && mean < 1e-4f && var > 0.999f && var < 1.001f;
        failed |= !ok;
        semihosting_write("group ");
        const char digit[2] = {(char)('0' + g), '\0'};
        semihosting_write(digit);
        semihosting_write(": mean ");
        write_fixed(mean);
        semihosting_write(" variance ");
        write_fixed(var);
        semihosting_write(ok ? " ok\n" : " WRONG\n");
    }
    semihosting_write(failed ? "FAILED\n" : "matlab_gn normalized in place: ok\n");
    return failed;
}
