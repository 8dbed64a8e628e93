/*
 * fw_io: the two services a gncodegen test harness needs from its platform: write text to the
 * host and stop with a status. Bare-metal images implement them with Arm semihosting
 * (semihosting.c), Linux builds with stdio (hosted_io.c).
 */
#ifndef FW_IO_H
#define FW_IO_H

#include <stdint.h>

/* Write a NUL-terminated string to the host's standard output. */
void fw_write(const char *text);

/* Stop the program: status 0 tells the host the run succeeded, anything else that it failed. */
void fw_exit(int status);

/*
 * Instruction counting, on images that run under QEMU with -icount: fw_count_start starts the
 * core's counter, fw_count reads it in the counter's own units (the host turns them into
 * instructions from the board's clock). Images that count link fw_count_systick.c (Cortex-M)
 * or fw_count_riscv.c (RISC-V).
 */
void fw_count_start(void);
uint64_t fw_count(void);

#endif /* FW_IO_H */
