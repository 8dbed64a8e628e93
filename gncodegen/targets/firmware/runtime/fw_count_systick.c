/*
 * Instruction counting on a Cortex-M: SysTick counts down from 2^24 - 1 on the core clock and
 * its interrupt counts the periods. Under `-icount shift=S` QEMU's virtual clock advances 2^S ns
 * per instruction, so the host turns ticks into instructions from the board's clock frequency;
 * on a real core the same counter gives core cycles.
 */
#include "fw_io.h"

#include <stdint.h>

#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)
#define SCB_ICSR (*(volatile uint32_t *)0xE000ED04u)
#define SYST_CSR_ENABLE 1u
#define SYST_CSR_TICKINT 2u
#define SYST_CSR_CORE_CLOCK 4u
#define ICSR_PENDSTSET (1u << 26) /* SysTick pending: a period ended, its handler not yet run */
#define SYST_MAX 0xFFFFFFu
#define SYST_PERIOD_BITS 24u

void SysTick_Handler(void);

static volatile uint32_t periods; /* times the counter reached 0 */

void SysTick_Handler(void)
{
    periods = periods + 1u;
}

void fw_count_start(void)
{
    SYST_RVR = SYST_MAX;
    SYST_CVR = 0u; /* any write clears it; the next tick loads SYST_MAX */
    SYST_CSR = SYST_CSR_ENABLE | SYST_CSR_TICKINT | SYST_CSR_CORE_CLOCK;
    while (SYST_CVR == 0u) {
    }
}

uint64_t fw_count(void)
{
    __asm__ volatile("cpsid i" ::: "memory");
    uint32_t done = periods;
    uint32_t value = SYST_CVR;
    if ((SCB_ICSR & ICSR_PENDSTSET) != 0u) {
        ++done; /* the counter reached 0 before or after that read: read it again */
        value = SYST_CVR;
    }
    __asm__ volatile("cpsie i" ::: "memory");
    if (value == 0u) {
        --done; /* reaching 0 ended the period but its last tick is counted below */
    }
    return ((uint64_t)done << SYST_PERIOD_BITS) + (SYST_MAX - value);
}
