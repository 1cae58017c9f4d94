/* Unit test: control messages, handled without a socket. */
#include <errno.h>
#include <string.h>

#include "daemon/daemon.h"
#include "tap.h"

static json_t *call(const char *text)
{
  json_error_t jerr;
  json_t *req = json_loads(text, 0, &jerr), *reply;

  if (!req) {
    fprintf(stderr, "bad test JSON: %s\n", text);
    exit(1);
  }
  reply = vdb_control_handle(req);
  json_decref(req);
  return reply;
}

static int reply_errno(json_t *r)
{
  json_t *e = json_object_get(r, "errno");
  return e ? (int)json_integer_value(e) : 0;
}

int main(void)
{
  json_t *r, *res;

  r = call("{\"vdbus\":1,\"op\":\"hello\"}");
  CHECK(reply_errno(r) == 0 && json_object_get(json_object_get(r, "result"), "version"));
  json_decref(r);
  r = call("{\"op\":\"frobnicate\"}");
  CHECK(reply_errno(r) == EOPNOTSUPP);
  CHECK(strstr(json_string_value(json_object_get(r, "error")), "frobnicate") != NULL);
  json_decref(r);
  r = call("{\"vdbus\":99,\"op\":\"list\"}");
  CHECK(reply_errno(r) == EPROTO);
  json_decref(r);
  r = call("[1,2]");
  CHECK(reply_errno(r) == EINVAL);
  json_decref(r);

  r = call("{\"op\":\"plug\",\"args\":{\"backend\":\"ram\",\"params\":{\"size\":\"1M\"},\"attach\":\"none\"}}");
  res = json_object_get(r, "result");
  CHECK(reply_errno(r) == 0 && strcmp(json_string_value(json_object_get(res, "name")), "vd0") == 0);
  CHECK(json_integer_value(json_object_get(res, "size")) == 1 << 20);
  CHECK(json_is_null(json_object_get(res, "device")));
  json_decref(r);
  r = call("{\"op\":\"plug\",\"args\":{\"backend\":\"ram\",\"name\":\"vd0\",\"params\":{\"size\":\"1M\"},\"attach\":\"none\"}}");
  CHECK(reply_errno(r) == EEXIST);
  json_decref(r);
  r = call("{\"op\":\"plug\",\"args\":{\"backend\":\"ram\",\"params\":{\"size\":\"lots\"},\"attach\":\"none\"}}");
  CHECK(reply_errno(r) == EINVAL && strstr(json_string_value(json_object_get(r, "error")), "size"));
  json_decref(r);
  r = call("{\"op\":\"plug\",\"args\":{\"backend\":\"tape\",\"params\":{\"size\":\"1M\"}}}");
  CHECK(reply_errno(r) == ENOENT);
  json_decref(r);
  r = call("{\"op\":\"plug\",\"args\":{\"backend\":\"ram\",\"bogus\":1}}");
  CHECK(reply_errno(r) == EINVAL);
  json_decref(r);
  r = call("{\"op\":\"plug\",\"args\":{\"backend\":\"ram\",\"name\":\"../x\",\"params\":{\"size\":\"1M\"},\"attach\":\"none\"}}");
  CHECK(reply_errno(r) == EINVAL);
  json_decref(r);
  r = call("{\"op\":\"plug\",\"args\":{\"backend\":\"ram\",\"block_size\":1024,\"params\":{\"size\":\"1M\"},\"attach\":\"none\"}}");
  CHECK(reply_errno(r) == EINVAL);
  json_decref(r);
  r = call("{\"op\":\"plug\",\"args\":{\"backend\":\"file\",\"params\":{\"path\":\"/nonexistent/x.img\"},\"attach\":\"none\"}}");
  CHECK(reply_errno(r) == ENOENT);
  json_decref(r);

  r = call("{\"op\":\"list\"}");
  res = json_object_get(r, "result");
  CHECK(json_is_array(res) && json_array_size(res) == 1);
  json_decref(r);
  r = call("{\"op\":\"info\",\"args\":{\"name\":\"vd0\"}}");
  res = json_object_get(r, "result");
  CHECK(json_object_get(json_object_get(res, "stats"), "reads") != NULL);
  json_decref(r);
  r = call("{\"op\":\"info\",\"args\":{\"name\":\"nope\"}}");
  CHECK(reply_errno(r) == ENOENT);
  json_decref(r);
  r = call("{\"op\":\"unplug\",\"args\":{\"name\":\"nope\"}}");
  CHECK(reply_errno(r) == ENOENT);
  json_decref(r);
  r = call("{\"op\":\"unplug\",\"args\":{\"name\":\"vd0\"}}");
  CHECK(reply_errno(r) == 0);
  json_decref(r);
  r = call("{\"op\":\"list\"}");
  CHECK(json_array_size(json_object_get(r, "result")) == 0);
  json_decref(r);
  return tap_done("control");
}
