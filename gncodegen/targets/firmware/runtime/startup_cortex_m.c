/*
 * Start-up code for the gncodegen Cortex-M test images: the vector table, the reset handler
 * (enable the FPU, and with it MVE on Armv8.1-M; copy .data; clear .bss; run main) and fault
 * handlers that report over semihosting and stop instead of looping forever.
 */
#include <stdint.h>

#include "fw_io.h"

int main(void);
void Reset_Handler(void);
void Fault_Handler(void);
void SysTick_Handler(void); /* fw_count_systick.c */

/* Defined by the linker script. */
extern uint32_t __data_load__[], __data_start__[], __data_end__[];
extern uint32_t __bss_start__[], __bss_end__[];
extern uint32_t __stack_top__[];

#define SCB_CPACR (*(volatile uint32_t *)0xE000ED88u)
#define CPACR_CP10_CP11_FULL (0xFu << 20) /* CP10/CP11: the FPU, and MVE on Armv8.1-M */

/*
 * Initial stack pointer, reset, then the 14 system exceptions (NMI, HardFault, MemManage,
 * BusFault, UsageFault, SecureFault, three reserved, SVCall, DebugMonitor, reserved, PendSV,
 * SysTick). The image enables no interrupt but SysTick's (the instruction count), so nothing
 * else can be taken.
 */
__attribute__((section(".vectors"), used))
static const uintptr_t vector_table[16] = {
    (uintptr_t)__stack_top__,
    (uintptr_t)Reset_Handler,
    (uintptr_t)Fault_Handler, (uintptr_t)Fault_Handler, (uintptr_t)Fault_Handler,
    (uintptr_t)Fault_Handler, (uintptr_t)Fault_Handler, (uintptr_t)Fault_Handler,
    0u, 0u, 0u,
    (uintptr_t)Fault_Handler, (uintptr_t)Fault_Handler, 0u,
    (uintptr_t)Fault_Handler, (uintptr_t)SysTick_Handler,
};

void Reset_Handler(void)
{
#if defined(__ARM_FP) || defined(__ARM_FEATURE_MVE)
    /* Before the first floating-point instruction, or it faults with NOCP. */
    SCB_CPACR |= CPACR_CP10_CP11_FULL;
    __asm__ volatile("dsb\n\tisb" ::: "memory");
#endif
    const uint32_t *src = __data_load__;
    for (uint32_t *dst = __data_start__; dst < __data_end__; ++dst, ++src) {
        *dst = *src;
    }
    for (uint32_t *dst = __bss_start__; dst < __bss_end__; ++dst) {
        *dst = 0u;
    }
    fw_exit(main());
}

void Fault_Handler(void)
{
    static const char *const names[16] = {
        "thread", "reset", "NMI", "HardFault", "MemManage", "BusFault", "UsageFault",
        "SecureFault", "reserved", "reserved", "reserved", "SVCall", "DebugMonitor", "reserved",
        "PendSV", "SysTick",
    };
    uint32_t ipsr;
    __asm__ volatile("mrs %0, ipsr" : "=r"(ipsr));
    fw_write("\nFAULT: ");
    fw_write(names[ipsr & 15u]);
    fw_write("\n");
    fw_exit(1);
}
