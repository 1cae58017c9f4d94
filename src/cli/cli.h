/* vdbus — the command-line tool: shared pieces. */
#ifndef VDB_CLI_H
#define VDB_CLI_H

#include <jansson.h>
#include <stdbool.h>

/* The control socket: --socket, else $VDBUS_SOCKET, else /run/vdbus/vdbus.sock. */
extern const char *cli_socket;

/* Print "vdbus: <what>: <why>" and exit(1). */
void cli_die(const char *what, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
/* Bad usage: print the message and a hint, exit(2). */
void cli_usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* Send {"vdbus":1,"op":op,"args":args} (steals args) and return the result
 * (new reference).  On a daemon error: prints "vdbus: <what>: <error>" and
 * exits 1. */
json_t *cli_call(const char *what, const char *op, json_t *args);

/* Exit with a message unless v is an attach mode (auto, ublk, nbd-kernel,
 * loop, none). */
void cli_check_attach(const char *what, const char *v);

int cli_plug(int argc, char **argv);
int cli_unplug(int argc, char **argv);
int cli_list(int argc, char **argv);
int cli_info(int argc, char **argv);
int cli_backends(int argc, char **argv);
int cli_snapshot(int argc, char **argv);
int cli_clone(int argc, char **argv);
int cli_commit(int argc, char **argv);

#endif
