/*
 * fw_io over Arm semihosting: QEMU (-semihosting-config enable=on,target=native) services a
 * `bkpt 0xAB` with the operation number in r0 and its argument in r1.
 */
#include "fw_io.h"

#include <stdint.h>

#define SYS_WRITE0 0x04u
#define SYS_EXIT 0x18u
#define ADP_STOPPED_APPLICATION_EXIT 0x20026u /* QEMU exits 0 */
#define ADP_STOPPED_RUNTIME_ERROR 0x20023u    /* QEMU exits 1 */

static uint32_t semihost(uint32_t operation, const void *argument)
{
    register uint32_t r0 __asm__("r0") = operation;
    register const void *r1 __asm__("r1") = argument;
    __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

void fw_write(const char *text)
{
    (void)semihost(SYS_WRITE0, text);
}

void fw_exit(int status)
{
    /* On 32-bit Arm SYS_EXIT takes the reason itself in r1, not a pointer to a block. */
    const uintptr_t reason = status == 0 ? ADP_STOPPED_APPLICATION_EXIT : ADP_STOPPED_RUNTIME_ERROR;
    for (;;) {
        (void)semihost(SYS_EXIT, (const void *)reason);
    }
}
