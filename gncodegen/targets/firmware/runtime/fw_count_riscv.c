/*
 * Instruction counting on RISC-V: the minstret CSR pair, read as one 64-bit value. QEMU with
 * -icount advances it by 2^S per instruction (shift=S), which the host divides out.
 */
#include "fw_io.h"

#include <stdint.h>

void fw_count_start(void)
{
}

uint64_t fw_count(void)
{
    uint32_t high, low, again;
    do {
        __asm__ volatile("csrr %0, minstreth" : "=r"(high));
        __asm__ volatile("csrr %0, minstret" : "=r"(low));
        __asm__ volatile("csrr %0, minstreth" : "=r"(again));
    } while (high != again);
    return ((uint64_t)high << 32) | low;
}
