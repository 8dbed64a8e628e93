/*
 * Fit the scale and offset of the train_sgdm layer (examples/train_sgdm.yaml) to a target's
 * by SGDM, the way MATLAB's trainnet does with sgdmupdate: forward_train, the loss's gradient,
 * backward, sgdm_update; the loss is printed every ten steps. The program builds against the
 * generated train_sgdm.h/.c and prints through fw_io (stdio on a host, semihosting on a
 * Cortex-M), so the same file runs in both places.
 *
 *   cc -std=c99 -O2 -I<generated> -I<fw_io.h> fit_sgdm.c train_sgdm.c hosted_io.c -lm
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "fw_io.h"
#include "train_sgdm.h"

#define BATCH 2u
#define NUMEL (BATCH * TRAIN_SGDM_OBSERVATION_NUMEL)
#define STEPS 100u

static float x[NUMEL];        /* the inputs, fixed */
static float target[NUMEL];   /* what the target layer makes of them */
static float y[NUMEL];
static float dy[NUMEL];       /* the loss's gradient at y, then backward's dx in place */
static float mean[BATCH * TRAIN_SGDM_NUM_GROUPS];
static float rstd[BATCH * TRAIN_SGDM_NUM_GROUPS];
static float scale[TRAIN_SGDM_NUM_CHANNELS];
static float offset[TRAIN_SGDM_NUM_CHANNELS];
static float dscale[TRAIN_SGDM_NUM_CHANNELS];
static float doffset[TRAIN_SGDM_NUM_CHANNELS];
static float scale_velocity[TRAIN_SGDM_NUM_CHANNELS];
static float offset_velocity[TRAIN_SGDM_NUM_CHANNELS];

/* A hash of i as a value in [-2, 2), the same on every platform. */
static float input(size_t i)
{
    uint32_t h = (uint32_t)i * 0x9E3779B9u;
    h = (h ^ (h >> 16)) * 0x85EBCA6Bu;
    h ^= h >> 13;
    return (float)((int32_t)(h >> 8) - 8388608) * 0x1p-22f;
}

static void write_unsigned(unsigned long value)
{
    char text[24];
    size_t i = sizeof text - 1;
    text[i] = '\0';
    do {
        text[--i] = (char)('0' + (int)(value % 10u));
        value /= 10u;
    } while (value != 0u && i > 0u);
    fw_write(&text[i]);
}

/* The loss as "step <k> loss <d.dddd>e<exponent>", without printf (which a Cortex-M image
   may lack). */
static void write_loss(unsigned step, float loss)
{
    int exponent = 0;
    while (loss >= 10.0f && exponent < 99) {
        loss /= 10.0f;
        ++exponent;
    }
    while (loss > 0.0f && loss < 1.0f && exponent > -99) {
        loss *= 10.0f;
        --exponent;
    }
    const unsigned long digits = (unsigned long)(loss * 1e4f + 0.5f); /* d.dddd as ddddd */
    fw_write("step ");
    write_unsigned(step);
    fw_write(" loss ");
    write_unsigned(digits / 10000u);
    fw_write(".");
    for (unsigned long unit = 1000u; unit > 0u; unit /= 10u) {
        write_unsigned(digits / unit % 10u);
    }
    fw_write(exponent < 0 ? "e-" : "e+");
    write_unsigned((unsigned long)(exponent < 0 ? -exponent : exponent));
    fw_write("\n");
}

int main(void)
{
    float target_scale[TRAIN_SGDM_NUM_CHANNELS];
    float target_offset[TRAIN_SGDM_NUM_CHANNELS];
    for (size_t c = 0; c < TRAIN_SGDM_NUM_CHANNELS; ++c) {
        target_scale[c] = 0.5f + 0.125f * (float)c;
        target_offset[c] = 0.25f * (float)c - 1.0f;
        scale[c] = train_sgdm_initial_scale[c];
        offset[c] = train_sgdm_initial_offset[c];
    }
    for (size_t i = 0; i < NUMEL; ++i) {
        x[i] = input(i);
    }
    if (train_sgdm_predict_with_params(x, target, BATCH, target_scale, target_offset) != TRAIN_SGDM_OK) {
        fw_write("predict failed\n");
        fw_exit(1);
    }
    memset(scale_velocity, 0, sizeof scale_velocity);
    memset(offset_velocity, 0, sizeof offset_velocity);
    float first = 0.0f; /* in float: a Cortex-M4 has no double-precision FPU */
    float loss = 0.0f;
    for (unsigned step = 0; step <= STEPS; ++step) {
        if (train_sgdm_forward_train(x, y, BATCH, scale, offset, mean, rstd) != TRAIN_SGDM_OK) {
            fw_write("forward_train failed\n");
            fw_exit(1);
        }
        /* loss = mean of (y - target)^2 / 2, and its gradient at y */
        loss = 0.0f;
        for (size_t i = 0; i < NUMEL; ++i) {
            const float e = y[i] - target[i];
            loss += 0.5f * e * e;
            dy[i] = e / (float)NUMEL;
        }
        loss /= (float)NUMEL;
        if (step == 0) {
            first = loss;
        }
        if (step % 10u == 0) {
            write_loss(step, loss);
        }
        if (train_sgdm_backward(x, dy, dy, dscale, doffset, BATCH, scale, offset, mean, rstd) != TRAIN_SGDM_OK
            || train_sgdm_sgdm_update(scale, offset, scale_velocity, offset_velocity, dscale, doffset, 0.5f, 0.9f,
                                      1e-4f) != TRAIN_SGDM_OK) {
            fw_write("backward or sgdm_update failed\n");
            fw_exit(1);
        }
    }
    /* Written so that a NaN fails. */
    const int fitted = loss <= first * 1e-3f;
    fw_write(fitted ? "fit ok\nend\n" : "fit FAILED\nend\n");
    fw_exit(fitted ? 0 : 1);
    return 0;
}
