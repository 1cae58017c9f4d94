/* vdbus — `vdbus list`, `vdbus info`, `vdbus backends`. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "common/size.h"

static bool parse_json_flag(int argc, char **argv, int nargs, const char **arg)
{
  bool json = false;

  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--json") == 0)
      json = true;
    else if (argv[i][0] == '-')
      cli_usage_error("%s: unknown option '%s'", argv[0], argv[i]);
    else if (nargs == 1 && !*arg)
      *arg = argv[i];
    else
      cli_usage_error("%s: unexpected argument '%s'", argv[0], argv[i]);
  }
  if (nargs == 1 && !*arg)
    cli_usage_error("%s needs a disk NAME", argv[0]);
  return json;
}

static void print_json(json_t *v)
{
  char *s = json_dumps(v, JSON_INDENT(2));
  printf("%s\n", s);
  free(s);
}

static const char *str_or(json_t *o, const char *key, const char *dflt)
{
  const char *s = json_string_value(json_object_get(o, key));
  return s ? s : dflt;
}

int cli_list(int argc, char **argv)
{
  const char *unused = NULL;
  bool json = parse_json_flag(argc, argv, 0, &unused);
  json_t *res = cli_call("list", "list", NULL), *d;
  size_t i;

  if (json) {
    print_json(res);
  } else {
    printf("%-12s %-8s %8s %-3s %-12s %s\n", "NAME", "BACKEND", "SIZE", "RO", "DEVICE", "NBD URI");
    json_array_foreach(res, i, d) {
      char sz[32];
      vdb_size_format((uint64_t)json_integer_value(json_object_get(d, "size")), sz, sizeof sz);
      printf("%-12s %-8s %8s %-3s %-12s %s\n", str_or(d, "name", "?"), str_or(d, "backend", "?"),
             sz, json_is_true(json_object_get(d, "readonly")) ? "yes" : "no",
             str_or(d, "device", "-"), str_or(d, "nbd_uri", "-"));
    }
  }
  json_decref(res);
  return 0;
}

static void print_object(const char *prefix, json_t *o)
{
  const char *key;
  json_t *v;

  json_object_foreach(o, key, v) {
    if (json_is_object(v)) {
      char p[64];
      snprintf(p, sizeof p, "%s%s.", prefix, key);
      print_object(p, v);
      continue;
    }
    printf("%s%s: ", prefix, key);
    if (json_is_string(v))
      printf("%s\n", json_string_value(v));
    else if (json_is_integer(v))
      printf("%lld\n", (long long)json_integer_value(v));
    else if (json_is_boolean(v))
      printf("%s\n", json_is_true(v) ? "yes" : "no");
    else
      printf("-\n");
  }
}

int cli_info(int argc, char **argv)
{
  const char *name = NULL;
  bool json = parse_json_flag(argc, argv, 1, &name);
  json_t *res = cli_call(name, "info", json_pack("{s:s}", "name", name));

  if (json)
    print_json(res);
  else
    print_object("", res);
  json_decref(res);
  return 0;
}

int cli_backends(int argc, char **argv)
{
  const char *unused = NULL;
  bool json = parse_json_flag(argc, argv, 0, &unused);
  json_t *res = cli_call("backends", "backends", NULL), *b;
  size_t i;

  if (json)
    print_json(res);
  else
    json_array_foreach(res, i, b) {
      const char *origin = str_or(b, "origin", "built-in");
      printf("%-8s %s\n", str_or(b, "name", "?"), str_or(b, "summary", ""));
      if (strcmp(origin, "built-in") != 0)
        printf("%-8s plugin %s\n", "", origin);
    }
  json_decref(res);
  return 0;
}
