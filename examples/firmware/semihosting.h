/* Output and exit through Arm semihosting (QEMU: -semihosting-config enable=on,target=native). */
#ifndef SEMIHOSTING_H
#define SEMIHOSTING_H

void semihosting_write(const char *text);
void semihosting_exit(int status);

#endif /* SEMIHOSTING_H */
