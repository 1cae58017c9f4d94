/* vdbus — talking to vdbusd over its control socket. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "cli/cli.h"

const char *cli_socket;

void cli_die(const char *what, const char *fmt, ...)
{
  va_list ap;

  fprintf(stderr, "vdbus: %s: ", what);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  exit(1);
}

void cli_usage_error(const char *fmt, ...)
{
  va_list ap;

  fprintf(stderr, "vdbus: ");
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\nTry 'vdbus --help'.\n");
  exit(2);
}

static int cli_connect(void)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  int fd;

  if (strlen(cli_socket) >= sizeof sa.sun_path)
    cli_die("connect", "socket path too long: %s", cli_socket);
  strcpy(sa.sun_path, cli_socket);
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
    cli_die("connect", "cannot reach vdbusd at %s: %s (is the daemon running? see --socket)",
            cli_socket, strerror(errno));
  return fd;
}

static void cli_send_all(int fd, const char *s, size_t len)
{
  while (len > 0) {
    ssize_t n = send(fd, s, len, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0)
      cli_die("send", "%s", strerror(errno));
    s += n;
    len -= (size_t)n;
  }
}

static char *cli_recv_line(int fd)
{
  size_t len = 0, cap = 4096;
  char *buf = malloc(cap);

  for (;;) {
    ssize_t n;
    if (!buf)
      cli_die("receive", "out of memory");
    if (len + 1 >= cap)
      buf = realloc(buf, cap *= 2);
    if (!buf)
      cli_die("receive", "out of memory");
    n = recv(fd, buf + len, cap - len - 1, 0);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0)
      cli_die("receive", "%s", strerror(errno));
    if (n == 0)
      cli_die("receive", "vdbusd closed the connection without answering");
    len += (size_t)n;
    buf[len] = '\0';
    if (memchr(buf, '\n', len))
      return buf;
  }
}

json_t *cli_call(const char *what, const char *op, json_t *args)
{
  int fd = cli_connect();
  json_t *req = json_pack("{s:i, s:s, s:o}", "vdbus", 1, "op", op, "args",
                          args ? args : json_object());
  char *text = json_dumps(req, JSON_COMPACT);
  json_error_t jerr;
  json_t *reply, *result, *err;
  char *line;

  json_decref(req);
  cli_send_all(fd, text, strlen(text));
  cli_send_all(fd, "\n", 1);
  free(text);
  line = cli_recv_line(fd);
  close(fd);
  reply = json_loads(line, JSON_DISABLE_EOF_CHECK, &jerr);
  free(line);
  if (!reply)
    cli_die(what, "bad reply from vdbusd: %s", jerr.text);
  err = json_object_get(reply, "error");
  if (err) {
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", json_string_value(err) ? json_string_value(err) : "unknown error");
    json_decref(reply);
    cli_die(what, "%s", msg);
  }
  result = json_object_get(reply, "result");
  if (!result) {
    json_decref(reply);
    cli_die(what, "bad reply from vdbusd: no result");
  }
  json_incref(result);
  json_decref(reply);
  return result;
}
