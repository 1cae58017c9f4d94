/* vdbus — NBD option negotiation (fixed newstyle), written from the
 * protocol specification.  Everything here is pure protocol: bytes in,
 * bytes out, so the parser can be tested from canned buffers.
 *
 * Rules followed (spec section "Option haggling" and the option list):
 *  - unknown options get NBD_REP_ERR_UNSUP and negotiation continues;
 *  - malformed option data gets NBD_REP_ERR_INVALID;
 *  - NBD_OPT_EXPORT_NAME of an unknown export ends the session (it cannot
 *    carry an error);
 *  - a client that did not set NBD_FLAG_C_FIXED_NEWSTYLE may only send
 *    NBD_OPT_EXPORT_NAME. */
#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "frontends/nbd/nbd-internal.h"
#include "frontends/nbd/nbd-proto.h"

/* ---- output buffer ---- */

void nbd_obuf_put(struct nbd_obuf *b, const void *data, size_t len)
{
  if (b->oom)
    return;
  if (b->len + len > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + len)
      cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p) {
      b->oom = true;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, data, len);
  b->len += len;
}

void nbd_obuf_be16(struct nbd_obuf *b, uint16_t v) { v = htobe16(v); nbd_obuf_put(b, &v, 2); }
void nbd_obuf_be32(struct nbd_obuf *b, uint32_t v) { v = htobe32(v); nbd_obuf_put(b, &v, 4); }
void nbd_obuf_be64(struct nbd_obuf *b, uint64_t v) { v = htobe64(v); nbd_obuf_put(b, &v, 8); }

void nbd_obuf_free(struct nbd_obuf *b)
{
  free(b->p);
  memset(b, 0, sizeof *b);
}

static uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }

/* ---- shared helpers ---- */

uint32_t nbd_errno_to_wire(int err)
{
  switch (err < 0 ? -err : err) {
  case 0: return 0;
  case EPERM: case EROFS: return NBD_EPERM;
  case EIO: return NBD_EIO;
  case ENOMEM: return NBD_ENOMEM;
  case EINVAL: return NBD_EINVAL;
  case ENOSPC: case EFBIG: case EDQUOT: return NBD_ENOSPC;
  case EOVERFLOW: return NBD_EOVERFLOW;
  case ENOTSUP: return NBD_ENOTSUP;      /* == EOPNOTSUPP on Linux */
  case ESHUTDOWN: return NBD_ESHUTDOWN;
  default: return NBD_EIO;
  }
}

uint16_t nbd_tflags(const struct vdb_disk *d, bool structured)
{
  uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_CACHE;

  if (d->readonly)
    f |= NBD_FLAG_READ_ONLY;
  else
    f |= NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;
  if (d->can_trim)
    f |= NBD_FLAG_SEND_TRIM;
  if (d->can_zero)
    f |= NBD_FLAG_SEND_WRITE_ZEROES;
  if (d->can_zero && d->can_fast_zero)
    f |= NBD_FLAG_SEND_FAST_ZERO;
  if (d->can_multi_conn)
    f |= NBD_FLAG_CAN_MULTI_CONN;
  if (structured)
    f |= NBD_FLAG_SEND_DF;
  return f;
}

int nbd_export_find(const char *name, struct vdb_disk **out)
{
  struct vdb_disk **v;
  int n, r = -ENOENT;

  if (name[0]) {
    if (vdb_bus_get(name, out) < 0)
      return -ENOENT;
    if ((*out)->export)
      return 0;
    vdb_disk_put(*out);
    return -ENOENT;
  }
  n = vdb_bus_list(&v);
  if (n < 0)
    return n;
  for (int i = 0; i < n; i++)
    if (v[i]->export && !atomic_load(&v[i]->closing)) {
      vdb_disk_get(v[i]);
      *out = v[i];
      r = 0;
      break;
    }
  vdb_bus_list_free(v, n);
  return r;
}

/* ---- replies ---- */

static void rep_header(struct nbd_obuf *out, uint32_t opt, uint32_t type, uint32_t len)
{
  nbd_obuf_be64(out, NBD_REP_MAGIC);
  nbd_obuf_be32(out, opt);
  nbd_obuf_be32(out, type);
  nbd_obuf_be32(out, len);
}

static void rep_ack(struct nbd_obuf *out, uint32_t opt)
{
  rep_header(out, opt, NBD_REP_ACK, 0);
}

/* An error reply carrying a message for humans. */
static int rep_err(struct nbd_obuf *out, uint32_t opt, uint32_t type, const char *msg)
{
  size_t len = strlen(msg);

  rep_header(out, opt, type, (uint32_t)len);
  nbd_obuf_put(out, msg, len);
  vdb_dbg(VDB_DBG_NBD, "option %u: error %#x: %s", opt, type, msg);
  return NBD_HS_CONTINUE;
}

/* ---- option data parsing ---- */

/* A length-prefixed string at data[*pos]: copy it (NUL-terminated) into
 * buf.  Returns 0, -EINVAL if malformed, -E2BIG if longer than bufsize-1. */
static int parse_string(const uint8_t *data, uint32_t len, uint32_t *pos, char *buf, size_t bufsize)
{
  uint32_t n;

  if (len - *pos < 4)
    return -EINVAL;
  n = get32(data + *pos);
  *pos += 4;
  if (n > len - *pos)
    return -EINVAL;
  if (memchr(data + *pos, 0, n))
    return -EINVAL;
  if (n >= bufsize) {
    *pos += n;
    return -E2BIG;
  }
  memcpy(buf, data + *pos, n);
  buf[n] = '\0';
  *pos += n;
  return 0;
}

/* ---- NBD_OPT_INFO / NBD_OPT_GO / NBD_OPT_EXPORT_NAME ---- */

static void info_export(struct nbd_obuf *out, uint32_t opt, const struct vdb_disk *d, uint16_t tflags)
{
  rep_header(out, opt, NBD_REP_INFO, 12);
  nbd_obuf_be16(out, NBD_INFO_EXPORT);
  nbd_obuf_be64(out, d->size);
  nbd_obuf_be16(out, tflags);
}

static void info_string(struct nbd_obuf *out, uint32_t opt, uint16_t type, const char *s)
{
  size_t n = strlen(s);

  rep_header(out, opt, NBD_REP_INFO, (uint32_t)(2 + n));
  nbd_obuf_be16(out, type);
  nbd_obuf_put(out, s, n);
}

static void info_block_size(struct nbd_obuf *out, uint32_t opt, const struct vdb_disk *d)
{
  uint32_t max = d->info.max_block && d->info.max_block < NBD_MAX_PAYLOAD ?
                 d->info.max_block : NBD_MAX_PAYLOAD;
  uint32_t min = d->info.min_block ? d->info.min_block : 1;
  uint32_t pref = d->info.pref_block > min ? d->info.pref_block : 4096;

  if (pref > max)
    pref = max;
  rep_header(out, opt, NBD_REP_INFO, 14);
  nbd_obuf_be16(out, NBD_INFO_BLOCK_SIZE);
  nbd_obuf_be32(out, min);
  nbd_obuf_be32(out, pref);
  nbd_obuf_be32(out, max);
}

static int opt_info_go(struct nbd_hs *hs, uint32_t opt, const uint8_t *data, uint32_t len,
                       struct nbd_obuf *out)
{
  char name[NBD_NAME_MAX + 1];
  uint32_t pos = 0;
  uint16_t nreq;
  bool want_name = false, want_desc = false;
  struct vdb_disk *d;
  int r = parse_string(data, len, &pos, name, sizeof name);

  if (r < 0 || len - pos < 2)
    return rep_err(out, opt, NBD_REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO request");
  nreq = get16(data + pos);
  pos += 2;
  if ((uint64_t)nreq * 2 != len - pos)
    return rep_err(out, opt, NBD_REP_ERR_INVALID, "information request count does not match length");
  for (uint16_t i = 0; i < nreq; i++) {
    uint16_t t = get16(data + pos + 2u * i);
    want_name |= t == NBD_INFO_NAME;
    want_desc |= t == NBD_INFO_DESCRIPTION;
    /* NBD_INFO_BLOCK_SIZE is always sent; unknown types are ignored. */
  }
  if (nbd_export_find(name, &d) < 0)
    return rep_err(out, opt, NBD_REP_ERR_UNKNOWN, "no such export");

  uint16_t tflags = nbd_tflags(d, hs->structured);
  info_export(out, opt, d, tflags);
  if (want_name)
    info_string(out, opt, NBD_INFO_NAME, d->name);
  if (want_desc)
    info_string(out, opt, NBD_INFO_DESCRIPTION, d->info.description);
  info_block_size(out, opt, d);
  rep_ack(out, opt);
  if (opt == NBD_OPT_INFO) {
    vdb_disk_put(d);
    return NBD_HS_CONTINUE;
  }
  /* Meta contexts were negotiated for a particular export. */
  if (strcmp(hs->meta_export, d->name) != 0)
    hs->meta_alloc = false;
  nbd_hs_release(hs);
  hs->disk = d;
  hs->tflags = tflags;
  return NBD_HS_TRANSMISSION;
}

static int opt_export_name(struct nbd_hs *hs, const uint8_t *data, uint32_t len, struct nbd_obuf *out)
{
  char name[NBD_NAME_MAX + 1];
  static const uint8_t zeroes[124];
  struct vdb_disk *d;

  if (len > NBD_NAME_MAX || memchr(data, 0, len))
    return NBD_HS_CLOSE;
  memcpy(name, data, len);
  name[len] = '\0';
  if (nbd_export_find(name, &d) < 0) {
    vdb_dbg(VDB_DBG_NBD, "NBD_OPT_EXPORT_NAME: no export '%s': closing", name);
    return NBD_HS_CLOSE;
  }
  if (strcmp(hs->meta_export, d->name) != 0)
    hs->meta_alloc = false;
  nbd_hs_release(hs);
  hs->disk = d;
  hs->tflags = nbd_tflags(d, hs->structured);
  nbd_obuf_be64(out, d->size);
  nbd_obuf_be16(out, hs->tflags);
  if (!hs->no_zeroes)
    nbd_obuf_put(out, zeroes, sizeof zeroes);
  return NBD_HS_TRANSMISSION;
}

/* ---- NBD_OPT_LIST ---- */

static int opt_list(uint32_t opt, uint32_t len, struct nbd_obuf *out)
{
  struct vdb_disk **v;
  int n;

  if (len != 0)
    return rep_err(out, opt, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
  n = vdb_bus_list(&v);
  if (n < 0)
    return rep_err(out, opt, NBD_REP_ERR_PLATFORM, "out of memory");
  for (int i = 0; i < n; i++) {
    size_t nl;
    if (!v[i]->export || atomic_load(&v[i]->closing))
      continue;
    nl = strlen(v[i]->name);
    rep_header(out, opt, NBD_REP_SERVER, (uint32_t)(4 + nl));
    nbd_obuf_be32(out, (uint32_t)nl);
    nbd_obuf_put(out, v[i]->name, nl);
  }
  vdb_bus_list_free(v, n);
  rep_ack(out, opt);
  return NBD_HS_CONTINUE;
}

/* ---- meta contexts ---- */

static const char meta_alloc[] = "base:allocation";

/* Does query q select base:allocation?  For LIST, "base:" (the whole
 * namespace) does too. */
static bool meta_matches(const char *q, bool list)
{
  return strcmp(q, meta_alloc) == 0 || (list && strcmp(q, "base:") == 0);
}

static void rep_meta(struct nbd_obuf *out, uint32_t opt, uint32_t id)
{
  rep_header(out, opt, NBD_REP_META_CONTEXT, (uint32_t)(4 + strlen(meta_alloc)));
  nbd_obuf_be32(out, id);
  nbd_obuf_put(out, meta_alloc, strlen(meta_alloc));
}

static int opt_meta(struct nbd_hs *hs, uint32_t opt, const uint8_t *data, uint32_t len,
                    struct nbd_obuf *out)
{
  bool list = opt == NBD_OPT_LIST_META_CONTEXT;
  char name[NBD_NAME_MAX + 1], q[NBD_NAME_MAX + 1];
  uint32_t pos = 0, nq;
  bool match = false;
  struct vdb_disk *d;
  int r;

  if (!hs->structured)
    return rep_err(out, opt, NBD_REP_ERR_INVALID, "structured replies must be negotiated first");
  if ((r = parse_string(data, len, &pos, name, sizeof name)) < 0 || len - pos < 4)
    return rep_err(out, opt, NBD_REP_ERR_INVALID, "malformed meta context request");
  nq = get32(data + pos);
  pos += 4;
  for (uint32_t i = 0; i < nq; i++) {
    if ((r = parse_string(data, len, &pos, q, sizeof q)) == -EINVAL)
      return rep_err(out, opt, NBD_REP_ERR_INVALID, "malformed meta context query");
    if (r == 0 && meta_matches(q, list))
      match = true;
  }
  if (pos != len)
    return rep_err(out, opt, NBD_REP_ERR_INVALID, "meta context request has trailing data");
  if (nbd_export_find(name, &d) < 0)
    return rep_err(out, opt, NBD_REP_ERR_UNKNOWN, "no such export");
  if (list) {
    if (nq == 0 || match)
      rep_meta(out, opt, 0);
  } else {
    hs->meta_alloc = match;
    snprintf(hs->meta_export, sizeof hs->meta_export, "%s", d->name);
    if (match)
      rep_meta(out, opt, NBD_META_ALLOC_ID);
  }
  vdb_disk_put(d);
  rep_ack(out, opt);
  return NBD_HS_CONTINUE;
}

/* ---- the dispatcher ---- */

void nbd_hs_greeting(struct nbd_obuf *out)
{
  nbd_obuf_be64(out, NBD_MAGIC);
  nbd_obuf_be64(out, NBD_IHAVEOPT);
  nbd_obuf_be16(out, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
}

int nbd_hs_client_flags(struct nbd_hs *hs, uint32_t flags)
{
  /* The server MUST close the connection on client flags it does not know. */
  if (flags & ~(uint32_t)(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES))
    return -EPROTO;
  hs->fixed = flags & NBD_FLAG_C_FIXED_NEWSTYLE;
  hs->no_zeroes = flags & NBD_FLAG_C_NO_ZEROES;
  return 0;
}

void nbd_hs_release(struct nbd_hs *hs)
{
  if (hs->disk) {
    vdb_disk_put(hs->disk);
    hs->disk = NULL;
  }
}

static int opt_simple_flag(uint32_t opt, uint32_t len, bool *already, struct nbd_obuf *out)
{
  if (len != 0)
    return rep_err(out, opt, NBD_REP_ERR_INVALID, "option takes no data");
  if (*already)
    return rep_err(out, opt, NBD_REP_ERR_INVALID, "already negotiated");
  *already = true;
  rep_ack(out, opt);
  return NBD_HS_CONTINUE;
}

int nbd_hs_option(struct nbd_hs *hs, uint32_t opt, const uint8_t *data, uint32_t len,
                  struct nbd_obuf *out)
{
  vdb_dbg(VDB_DBG_NBD, "option %u, %u bytes", opt, len);
  if (opt == NBD_OPT_EXPORT_NAME)
    return opt_export_name(hs, data, len, out);
  if (!hs->fixed)
    return NBD_HS_CLOSE; /* plain newstyle knows no other option */
  if (opt == NBD_OPT_ABORT) {
    rep_ack(out, opt);
    return NBD_HS_CLOSE;
  }
  if (hs->shutting_down)
    return rep_err(out, opt, NBD_REP_ERR_SHUTDOWN, "server is shutting down");

  switch (opt) {
  case NBD_OPT_LIST:
    return opt_list(opt, len, out);
  case NBD_OPT_INFO:
  case NBD_OPT_GO:
    return opt_info_go(hs, opt, data, len, out);
  case NBD_OPT_STRUCTURED_REPLY:
    return opt_simple_flag(opt, len, &hs->structured, out);
  case NBD_OPT_EXTENDED_HEADERS: {
    int r = opt_simple_flag(opt, len, &hs->extended, out);
    if (hs->extended)
      hs->structured = true;
    return r;
  }
  case NBD_OPT_LIST_META_CONTEXT:
  case NBD_OPT_SET_META_CONTEXT:
    return opt_meta(hs, opt, data, len, out);
  case NBD_OPT_STARTTLS:
    return rep_err(out, opt, NBD_REP_ERR_POLICY, "TLS is not enabled on this server");
  default:
    return rep_err(out, opt, NBD_REP_ERR_UNSUP, "unknown option");
  }
}

int nbd_hs_option_too_big(struct nbd_hs *hs, uint32_t opt, struct nbd_obuf *out)
{
  if (opt == NBD_OPT_EXPORT_NAME || !hs->fixed)
    return NBD_HS_CLOSE;
  return rep_err(out, opt, NBD_REP_ERR_TOO_BIG, "option data too long");
}
