/*
 * Start-up for QEMU's mps2-an386 (Cortex-M4F): vector table, reset handler that enables the FPU,
 * copies .data and clears .bss, and the two semihosting calls the example uses for its output.
 */
#include <stdint.h>

#include "semihosting.h"

int main(void);
void Reset_Handler(void);
void Fault_Handler(void);

extern uint32_t __data_load__[], __data_start__[], __data_end__[];
extern uint32_t __bss_start__[], __bss_end__[], __stack_top__[];

/* Stack pointer, reset, NMI, HardFault, MemManage, BusFault, UsageFault. */
__attribute__((section(".vectors"), used))
static const uintptr_t vector_table[7] = {
    (uintptr_t)__stack_top__, (uintptr_t)Reset_Handler, (uintptr_t)Fault_Handler,
    (uintptr_t)Fault_Handler, (uintptr_t)Fault_Handler, (uintptr_t)Fault_Handler,
    (uintptr_t)Fault_Handler,
};

void Reset_Handler(void)
{
    /* CP10 and CP11 (the FPU) full access, before any floating-point instruction. */
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20;
    __asm__ volatile("dsb\n\tisb" ::: "memory");
    const uint32_t *src = __data_load__;
    for (uint32_t *dst = __data_start__; dst < __data_end__; ++dst) {
        *dst = *src++;
    }
    for (uint32_t *dst = __bss_start__; dst < __bss_end__; ++dst) {
        *dst = 0u;
    }
    semihosting_exit(main());
}

void Fault_Handler(void)
{
    semihosting_write("fault\n");
    semihosting_exit(1);
}

static uint32_t semihost(uint32_t operation, const void *argument)
{
    register uint32_t r0 __asm__("r0") = operation;
    register const void *r1 __asm__("r1") = argument;
    __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

void semihosting_write(const char *text)
{
    (void)semihost(0x04u, text); /* SYS_WRITE0 */
}

void semihosting_exit(int status)
{
    /* SYS_EXIT: ApplicationExit makes QEMU exit 0, RunTimeError exit 1. */
    const uintptr_t reason = status == 0 ? 0x20026u : 0x20023u;
    for (;;) {
        (void)semihost(0x18u, (const void *)reason);
    }
}
