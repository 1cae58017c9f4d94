/* vdbus — string key/value parameters. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/params.h"
#include "common/size.h"

void vdb_params_init(struct vdb_params *p) { memset(p, 0, sizeof *p); }

static int params_find(const struct vdb_params *p, const char *key)
{
  for (int i = 0; i < p->n; i++)
    if (strcmp(p->key[i], key) == 0)
      return i;
  return -1;
}

int vdb_params_set(struct vdb_params *p, const char *key, const char *val)
{
  int i = params_find(p, key);
  char *v = strdup(val);

  if (!v)
    return -ENOMEM;
  if (i >= 0) {
    free(p->val[i]);
    p->val[i] = v;
    return 0;
  }
  if (p->n == VDB_PARAMS_MAX) {
    free(v);
    return -E2BIG;
  }
  p->key[p->n] = strdup(key);
  if (!p->key[p->n]) {
    free(v);
    return -ENOMEM;
  }
  p->val[p->n++] = v;
  return 0;
}

void vdb_params_clear(struct vdb_params *p)
{
  for (int i = 0; i < p->n; i++) {
    free(p->key[i]);
    free(p->val[i]);
  }
  p->n = 0;
}

int vdb_params_copy(struct vdb_params *dst, const struct vdb_params *src)
{
  vdb_params_init(dst);
  for (int i = 0; i < src->n; i++) {
    int r = vdb_params_set(dst, src->key[i], src->val[i]);
    if (r < 0) {
      vdb_params_clear(dst);
      return r;
    }
  }
  return 0;
}

const char *vdb_params_get(const struct vdb_params *p, const char *key)
{
  int i = params_find(p, key);
  return i >= 0 ? p->val[i] : NULL;
}

int vdb_params_get_size(const struct vdb_params *p, const char *key, uint64_t *out)
{
  const char *v = vdb_params_get(p, key);

  if (!v)
    return -ENOENT;
  return vdb_size_parse(v, out) < 0 ? -EINVAL : 0;
}

bool vdb_params_get_bool(const struct vdb_params *p, const char *key)
{
  const char *v = vdb_params_get(p, key);

  return v && (strcmp(v, "1") == 0 || strcasecmp(v, "true") == 0 ||
               strcasecmp(v, "yes") == 0 || strcasecmp(v, "on") == 0);
}
