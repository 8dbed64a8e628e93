/*
 * fw_io: the two services a gncodegen test harness needs from its platform: write text to the
 * host and stop with a status. Bare-metal images implement them with Arm semihosting
 * (semihosting.c), Linux builds with stdio (hosted_io.c).
 */
#ifndef FW_IO_H
#define FW_IO_H

/* Write a NUL-terminated string to the host's standard output. */
void fw_write(const char *text);

/* Stop the program: status 0 tells the host the run succeeded, anything else that it failed. */
void fw_exit(int status);

#endif /* FW_IO_H */
