/* vdbus — copying a payload into memory that is not in the cache. */
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/copy.h"

void vdb_copy_stream(void *dst_, const void *src_, size_t len)
{
  uint8_t *dst = dst_;
  const uint8_t *src = src_;

#if defined(__x86_64__)
  if (len >= VDB_COPY_STREAM_MIN) {
    size_t head = -(uintptr_t)dst & 15;

    memcpy(dst, src, head);
    dst += head, src += head, len -= head;
    for (; len >= 64; dst += 64, src += 64, len -= 64) {
      __m128i a = _mm_loadu_si128((const __m128i *)src);
      __m128i b = _mm_loadu_si128((const __m128i *)src + 1);
      __m128i c = _mm_loadu_si128((const __m128i *)src + 2);
      __m128i d = _mm_loadu_si128((const __m128i *)src + 3);
      _mm_stream_si128((__m128i *)dst, a);
      _mm_stream_si128((__m128i *)dst + 1, b);
      _mm_stream_si128((__m128i *)dst + 2, c);
      _mm_stream_si128((__m128i *)dst + 3, d);
    }
    _mm_sfence();
  }
#endif
  memcpy(dst, src, len);
}
