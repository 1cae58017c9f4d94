/* vdbus — per-thread error messages. */
#include <stdarg.h>
#include <stdio.h>

#include "common/error.h"

static _Thread_local char error_msg[512];

void vdb_set_error(const char *fmt, ...)
{
  va_list ap;

  va_start(ap, fmt);
  vsnprintf(error_msg, sizeof error_msg, fmt, ap);
  va_end(ap);
}

const char *vdb_get_error(void) { return error_msg; }
void vdb_clear_error(void) { error_msg[0] = '\0'; }
