/* fw_io over stdio, for harnesses that run as Linux programs (qemu-aarch64 user mode). */
#include "fw_io.h"

#include <stdio.h>
#include <stdlib.h>

void fw_write(const char *text)
{
    (void)fputs(text, stdout);
}

void fw_exit(int status)
{
    (void)fflush(stdout);
    exit(status == 0 ? EXIT_SUCCESS : EXIT_FAILURE);
}
