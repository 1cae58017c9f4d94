/* Unit test: NBD option negotiation from canned bytes (no sockets).  Each
 * case feeds one option to nbd_hs_option() and decodes the replies. */
#include <endian.h>
#include <errno.h>
#include <string.h>

#include "bus/bus.h"
#include "frontends/nbd/nbd-internal.h"
#include "frontends/nbd/nbd-proto.h"
#include "tap.h"

struct reply {
  uint32_t opt, type, len;
  const uint8_t *data;
};

static uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }
static uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }

/* Split out into replies; returns their count or -1 if malformed. */
static int parse_replies(const struct nbd_obuf *out, struct reply *r, int max)
{
  size_t pos = 0;
  int n = 0;

  while (pos < out->len) {
    if (out->len - pos < 20 || n == max || rd64(out->p + pos) != NBD_REP_MAGIC)
      return -1;
    r[n].opt = rd32(out->p + pos + 8);
    r[n].type = rd32(out->p + pos + 12);
    r[n].len = rd32(out->p + pos + 16);
    r[n].data = out->p + pos + 20;
    pos += 20;
    if (out->len - pos < r[n].len)
      return -1;
    pos += r[n].len;
    n++;
  }
  return n;
}

/* Builders for option data. */
struct buf { uint8_t b[8192]; uint32_t n; };
static void b32(struct buf *b, uint32_t v) { v = htobe32(v); memcpy(b->b + b->n, &v, 4); b->n += 4; }
static void b16(struct buf *b, uint16_t v) { v = htobe16(v); memcpy(b->b + b->n, &v, 2); b->n += 2; }
static void bstr(struct buf *b, const char *s) { b32(b, (uint32_t)strlen(s)); memcpy(b->b + b->n, s, strlen(s)); b->n += (uint32_t)strlen(s); }

static int run(struct nbd_hs *hs, uint32_t opt, const struct buf *b, struct reply *r, int *nr)
{
  static struct nbd_obuf out;
  int res;

  out.len = 0;
  res = nbd_hs_option(hs, opt, b ? b->b : NULL, b ? b->n : 0, &out);
  *nr = parse_replies(&out, r, 16);
  return res;
}

static void test_greeting_and_flags(void)
{
  struct nbd_obuf out = { 0 };
  struct nbd_hs hs = { 0 };

  nbd_hs_greeting(&out);
  CHECK(out.len == 18);
  CHECK(rd64(out.p) == NBD_MAGIC && rd64(out.p + 8) == NBD_IHAVEOPT);
  CHECK(rd16(out.p + 16) == (NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
  nbd_obuf_free(&out);
  CHECK(nbd_hs_client_flags(&hs, 3) == 0 && hs.fixed && hs.no_zeroes);
  CHECK(nbd_hs_client_flags(&hs, 4) == -EPROTO);      /* unknown client flag: close */
}

static void test_unknown_and_simple(void)
{
  struct nbd_hs hs = { .fixed = true };
  struct reply r[16];
  struct buf b = { .n = 0 };
  int n;

  CHECK(run(&hs, 999, NULL, r, &n) == NBD_HS_CONTINUE);
  CHECK(n == 1 && r[0].opt == 999 && r[0].type == NBD_REP_ERR_UNSUP);
  CHECK(run(&hs, NBD_OPT_PEEK_EXPORT, NULL, r, &n) == NBD_HS_CONTINUE && r[0].type == NBD_REP_ERR_UNSUP);
  CHECK(run(&hs, NBD_OPT_STARTTLS, NULL, r, &n) == NBD_HS_CONTINUE && r[0].type == NBD_REP_ERR_POLICY);

  /* Meta contexts before structured replies: invalid. */
  bstr(&b, "vd0");
  b32(&b, 0);
  CHECK(run(&hs, NBD_OPT_SET_META_CONTEXT, &b, r, &n) == NBD_HS_CONTINUE && r[0].type == NBD_REP_ERR_INVALID);

  b.n = 1;
  CHECK(run(&hs, NBD_OPT_STRUCTURED_REPLY, &b, r, &n) == NBD_HS_CONTINUE && r[0].type == NBD_REP_ERR_INVALID);
  CHECK(!hs.structured);
  CHECK(run(&hs, NBD_OPT_STRUCTURED_REPLY, NULL, r, &n) == NBD_HS_CONTINUE && r[0].type == NBD_REP_ACK);
  CHECK(hs.structured && !hs.extended);
  CHECK(run(&hs, NBD_OPT_STRUCTURED_REPLY, NULL, r, &n) == NBD_HS_CONTINUE && r[0].type == NBD_REP_ERR_INVALID);
  CHECK(run(&hs, NBD_OPT_EXTENDED_HEADERS, NULL, r, &n) == NBD_HS_CONTINUE && r[0].type == NBD_REP_ACK);
  CHECK(hs.extended);
  CHECK(run(&hs, NBD_OPT_EXTENDED_HEADERS, NULL, r, &n) == NBD_HS_CONTINUE && r[0].type == NBD_REP_ERR_INVALID);
  CHECK(run(&hs, NBD_OPT_ABORT, NULL, r, &n) == NBD_HS_CLOSE && n == 1 && r[0].type == NBD_REP_ACK);

  /* Without fixed newstyle only NBD_OPT_EXPORT_NAME is allowed. */
  struct nbd_hs plain = { 0 };
  CHECK(run(&plain, NBD_OPT_LIST, NULL, r, &n) == NBD_HS_CLOSE);
  /* Too-long option data. */
  struct nbd_obuf out = { 0 };
  CHECK(nbd_hs_option_too_big(&hs, NBD_OPT_GO, &out) == NBD_HS_CONTINUE);
  CHECK(parse_replies(&out, r, 16) == 1 && r[0].type == NBD_REP_ERR_TOO_BIG);
  CHECK(nbd_hs_option_too_big(&hs, NBD_OPT_EXPORT_NAME, &out) == NBD_HS_CLOSE);
  nbd_obuf_free(&out);
}

static void test_list(void)
{
  struct nbd_hs hs = { .fixed = true };
  struct reply r[16];
  struct buf b = { .n = 1 };
  int n;

  CHECK(run(&hs, NBD_OPT_LIST, &b, r, &n) == NBD_HS_CONTINUE && r[0].type == NBD_REP_ERR_INVALID);
  CHECK(run(&hs, NBD_OPT_LIST, NULL, r, &n) == NBD_HS_CONTINUE);
  CHECK(n == 3); /* vd0, ro; hidden (not exported) is not listed */
  CHECK(r[0].type == NBD_REP_SERVER && rd32(r[0].data) == 3 && memcmp(r[0].data + 4, "vd0", 3) == 0);
  CHECK(r[1].type == NBD_REP_SERVER && rd32(r[1].data) == 2 && memcmp(r[1].data + 4, "ro", 2) == 0);
  CHECK(r[2].type == NBD_REP_ACK);
}

static void test_info_go(void)
{
  struct nbd_hs hs = { .fixed = true };
  struct reply r[16];
  struct buf b = { .n = 0 };
  int n;

  /* INFO for vd0 asking for name, description and an unknown type. */
  bstr(&b, "vd0");
  b16(&b, 3);
  b16(&b, NBD_INFO_NAME);
  b16(&b, NBD_INFO_DESCRIPTION);
  b16(&b, 77);
  CHECK(run(&hs, NBD_OPT_INFO, &b, r, &n) == NBD_HS_CONTINUE);
  CHECK(n == 5);
  CHECK(r[0].type == NBD_REP_INFO && r[0].len == 12 && rd16(r[0].data) == NBD_INFO_EXPORT);
  CHECK(rd64(r[0].data + 2) == 1000001);
  uint16_t tf = rd16(r[0].data + 10);
  CHECK((tf & NBD_FLAG_HAS_FLAGS) && !(tf & NBD_FLAG_READ_ONLY) && (tf & NBD_FLAG_SEND_FLUSH) &&
        (tf & NBD_FLAG_SEND_TRIM) && (tf & NBD_FLAG_SEND_WRITE_ZEROES) && (tf & NBD_FLAG_CAN_MULTI_CONN) &&
        !(tf & NBD_FLAG_SEND_DF));
  CHECK(r[1].type == NBD_REP_INFO && rd16(r[1].data) == NBD_INFO_NAME && r[1].len == 5);
  CHECK(r[2].type == NBD_REP_INFO && rd16(r[2].data) == NBD_INFO_DESCRIPTION);
  CHECK(r[3].type == NBD_REP_INFO && rd16(r[3].data) == NBD_INFO_BLOCK_SIZE && r[3].len == 14);
  CHECK(rd32(r[3].data + 2) >= 1 && rd32(r[3].data + 6) >= rd32(r[3].data + 2));
  CHECK(r[4].type == NBD_REP_ACK);
  CHECK(hs.disk == NULL);

  /* Malformed: count says 3 requests, data holds 2. */
  b.n -= 2;
  CHECK(run(&hs, NBD_OPT_GO, &b, r, &n) == NBD_HS_CONTINUE && n == 1 && r[0].type == NBD_REP_ERR_INVALID);
  /* Name length beyond the data. */
  b.n = 0;
  b32(&b, 100);
  CHECK(run(&hs, NBD_OPT_GO, &b, r, &n) == NBD_HS_CONTINUE && r[0].type == NBD_REP_ERR_INVALID);
  /* Unknown export, and a disk that is not exported. */
  b.n = 0;
  bstr(&b, "nosuch");
  b16(&b, 0);
  CHECK(run(&hs, NBD_OPT_GO, &b, r, &n) == NBD_HS_CONTINUE && r[0].type == NBD_REP_ERR_UNKNOWN);
  b.n = 0;
  bstr(&b, "hidden");
  b16(&b, 0);
  CHECK(run(&hs, NBD_OPT_INFO, &b, r, &n) == NBD_HS_CONTINUE && r[0].type == NBD_REP_ERR_UNKNOWN);

  /* Read-only export: flags say so. */
  b.n = 0;
  bstr(&b, "ro");
  b16(&b, 0);
  CHECK(run(&hs, NBD_OPT_INFO, &b, r, &n) == NBD_HS_CONTINUE && r[0].type == NBD_REP_INFO);
  tf = rd16(r[0].data + 10);
  CHECK((tf & NBD_FLAG_READ_ONLY) && !(tf & NBD_FLAG_SEND_TRIM) && !(tf & NBD_FLAG_SEND_WRITE_ZEROES));

  /* GO with the default export "" enters transmission on the first export. */
  b.n = 0;
  bstr(&b, "");
  b16(&b, 0);
  CHECK(run(&hs, NBD_OPT_GO, &b, r, &n) == NBD_HS_TRANSMISSION);
  CHECK(hs.disk && strcmp(hs.disk->name, "vd0") == 0);
  CHECK(n == 3 && r[0].type == NBD_REP_INFO && r[2].type == NBD_REP_ACK);
  nbd_hs_release(&hs);
}

static void test_export_name(void)
{
  struct nbd_hs hs = { .fixed = true, .no_zeroes = true };
  struct nbd_obuf out = { 0 };

  CHECK(nbd_hs_option(&hs, NBD_OPT_EXPORT_NAME, (const uint8_t *)"nosuch", 6, &out) == NBD_HS_CLOSE);
  CHECK(out.len == 0);
  CHECK(nbd_hs_option(&hs, NBD_OPT_EXPORT_NAME, (const uint8_t *)"vd0", 3, &out) == NBD_HS_TRANSMISSION);
  CHECK(out.len == 10 && rd64(out.p) == 1000001);
  nbd_hs_release(&hs);
  out.len = 0;
  hs.no_zeroes = false;
  CHECK(nbd_hs_option(&hs, NBD_OPT_EXPORT_NAME, (const uint8_t *)"vd0", 3, &out) == NBD_HS_TRANSMISSION);
  CHECK(out.len == 134);
  nbd_hs_release(&hs);
  nbd_obuf_free(&out);
}

static void test_meta(void)
{
  struct nbd_hs hs = { .fixed = true, .structured = true };
  struct reply r[16];
  struct buf b = { .n = 0 };
  int n;

  /* LIST with no queries: every context we have. */
  bstr(&b, "vd0");
  b32(&b, 0);
  CHECK(run(&hs, NBD_OPT_LIST_META_CONTEXT, &b, r, &n) == NBD_HS_CONTINUE);
  CHECK(n == 2 && r[0].type == NBD_REP_META_CONTEXT && r[0].len == 4 + 15 &&
        memcmp(r[0].data + 4, "base:allocation", 15) == 0 && r[1].type == NBD_REP_ACK);
  /* LIST "base:" matches; "qemu:dirty-bitmap:x" does not. */
  b.n = 0;
  bstr(&b, "vd0");
  b32(&b, 1);
  bstr(&b, "qemu:dirty-bitmap:x");
  CHECK(run(&hs, NBD_OPT_LIST_META_CONTEXT, &b, r, &n) == NBD_HS_CONTINUE && n == 1 && r[0].type == NBD_REP_ACK);
  b.n = 0;
  bstr(&b, "vd0");
  b32(&b, 1);
  bstr(&b, "base:");
  CHECK(run(&hs, NBD_OPT_LIST_META_CONTEXT, &b, r, &n) == NBD_HS_CONTINUE && n == 2);
  /* SET base:allocation gets an id. */
  b.n = 0;
  bstr(&b, "vd0");
  b32(&b, 2);
  bstr(&b, "base:allocation");
  bstr(&b, "other:thing");
  CHECK(run(&hs, NBD_OPT_SET_META_CONTEXT, &b, r, &n) == NBD_HS_CONTINUE);
  CHECK(n == 2 && r[0].type == NBD_REP_META_CONTEXT && rd32(r[0].data) == NBD_META_ALLOC_ID);
  CHECK(hs.meta_alloc);
  /* Query count larger than the data: invalid. */
  b.n = 0;
  bstr(&b, "vd0");
  b32(&b, 3);
  bstr(&b, "base:allocation");
  CHECK(run(&hs, NBD_OPT_SET_META_CONTEXT, &b, r, &n) == NBD_HS_CONTINUE && n == 1 &&
        r[0].type == NBD_REP_ERR_INVALID);
  /* Unknown export. */
  b.n = 0;
  bstr(&b, "nosuch");
  b32(&b, 0);
  CHECK(run(&hs, NBD_OPT_SET_META_CONTEXT, &b, r, &n) == NBD_HS_CONTINUE && r[0].type == NBD_REP_ERR_UNKNOWN);
  /* GO to another export drops the context negotiated for vd0. */
  hs.meta_alloc = true;
  snprintf(hs.meta_export, sizeof hs.meta_export, "vd0");
  b.n = 0;
  bstr(&b, "ro");
  b16(&b, 0);
  CHECK(run(&hs, NBD_OPT_GO, &b, r, &n) == NBD_HS_TRANSMISSION && !hs.meta_alloc);
  CHECK(rd16(r[0].data + 10) & NBD_FLAG_SEND_DF);
  nbd_hs_release(&hs);
}

static void plug(const char *name, const char *size, bool ro, bool export)
{
  struct vdb_disk_config cfg = { .backend = "ram", .block_size = 512, .attach = "none",
                                 .readonly = ro, .export = export };
  snprintf(cfg.name, sizeof cfg.name, "%s", name);
  vdb_params_init(&cfg.params);
  vdb_params_set(&cfg.params, "size", size);
  CHECK(vdb_bus_plug(&cfg, NULL) == 0);
  vdb_params_clear(&cfg.params);
}

int main(void)
{
  plug("vd0", "1000001", false, true);
  plug("ro", "1M", true, true);
  plug("hidden", "1M", false, false);
  test_greeting_and_flags();
  test_unknown_and_simple();
  test_list();
  test_info_go();
  test_export_name();
  test_meta();
  vdb_bus_unplug_all();
  return tap_done("nbd-options");
}
