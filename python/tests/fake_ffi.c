/* A stand-in for libbufferheap_ffi with the same C ABI, for testing the Python side.
 *
 * Memory comes from malloc, or with -DWITH_CUDA from the CUDA driver (cuMemAlloc through
 * dlopen("libcuda.so.1"), no headers or link flags needed), so the same file also lets the
 * PyTorch integration and the GPU harness run where the real library is not built yet.
 * Blocks are rounded to a power of two (>= 512 B) and cached per exact rounded size.
 *
 *   cc -shared -fPIC -O2 -o libfake_ffi.so fake_ffi.c -lpthread [-DWITH_CUDA -ldl]
 */
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>

#ifdef WITH_CUDA
#include <dlfcn.h>
typedef int (*cu_alloc_t)(unsigned long long *, size_t);
typedef int (*cu_free_t)(unsigned long long);
typedef int (*cu_ctx_get_t)(void **);
typedef int (*cu_ctx_set_t)(void *);
typedef int (*cu_primary_t)(void **, int);
static cu_alloc_t cu_alloc;
static cu_free_t cu_free;
static cu_ctx_get_t cu_ctx_get;
static cu_ctx_set_t cu_ctx_set;
static cu_primary_t cu_primary;
static int cuda_load(void) {
    if (cu_alloc) return 0;
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!h) return -1;
    cu_alloc = (cu_alloc_t)dlsym(h, "cuMemAlloc_v2");
    cu_free = (cu_free_t)dlsym(h, "cuMemFree_v2");
    cu_ctx_get = (cu_ctx_get_t)dlsym(h, "cuCtxGetCurrent");
    cu_ctx_set = (cu_ctx_set_t)dlsym(h, "cuCtxSetCurrent");
    cu_primary = (cu_primary_t)dlsym(h, "cuDevicePrimaryCtxRetain");
    return (cu_alloc && cu_free && cu_ctx_get && cu_ctx_set && cu_primary) ? 0 : -1;
}
static void *raw_alloc(size_t n, int device) {
    void *ctx = NULL;
    unsigned long long p = 0;
    if (cuda_load()) return NULL;
    if (cu_ctx_get(&ctx) || !ctx) {
        if (cu_primary(&ctx, device) || cu_ctx_set(ctx)) return NULL;
    }
    return cu_alloc(&p, n) ? NULL : (void *)(uintptr_t)p;
}
static void raw_free(void *p) { cu_free((unsigned long long)(uintptr_t)p); }
#else
static void *raw_alloc(size_t n, int device) { (void)device; return malloc(n); }
static void raw_free(void *p) { free(p); }
#endif

#define MAX_DEVICES 8
#define MAX_TRACE 4096

typedef struct Block {
    void *ptr;
    size_t size, requested;
    int device, live;
    void *stream;
    struct Block *next;
} Block;

typedef struct {
    const char *action;
    uintptr_t addr;
    size_t size;
    void *stream;
    long long time_us;
} Trace;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static Block *blocks; /* live and cached */
static long long allocated[MAX_DEVICES], allocated_peak[MAX_DEVICES];
static long long reserved[MAX_DEVICES], reserved_peak[MAX_DEVICES];
static long long num_alloc[MAX_DEVICES], num_ooms[MAX_DEVICES], num_device_alloc[MAX_DEVICES];
static Trace traces[MAX_DEVICES][MAX_TRACE];
static int ntrace[MAX_DEVICES];
static int any_device, configured_after_use;
static char policy[16] = "default";
static double low_ratio, high_ratio, fraction[MAX_DEVICES];
static int debug_flags, init_count, reset_count, record_stream_count;
static __thread char last_error[512];

static void set_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
}

static long long now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void trace(int d, const char *action, void *p, size_t size, void *stream) {
    if (ntrace[d] < MAX_TRACE)
        traces[d][ntrace[d]++] = (Trace){action, (uintptr_t)p, size, stream, now_us()};
}

static size_t round_size(size_t n) {
    size_t r = 512;
    while (r < n) r <<= 1;
    return r;
}

void *bufferheap_malloc(ssize_t size, int device, void *stream) {
    if (size <= 0) return NULL;
    if (device < 0 || device >= MAX_DEVICES) { set_error("invalid device %d", device); return NULL; }
    size_t n = round_size((size_t)size);
    pthread_mutex_lock(&mu);
    any_device = 1;
    Block *b = blocks;
    while (b && (b->live || b->size != n || b->device != device)) b = b->next;
    if (!b) {
        void *p = (size_t)size > ((size_t)1 << 44) ? NULL : raw_alloc(n, device);
        if (!p) {
            num_ooms[device]++;
            trace(device, "oom", NULL, (size_t)size, stream);
            pthread_mutex_unlock(&mu);
            set_error("out of memory: %zd bytes on device %d", size, device);
            return NULL;
        }
        b = calloc(1, sizeof *b);
        *b = (Block){p, n, 0, device, 0, stream, blocks};
        blocks = b;
        reserved[device] += n;
        num_device_alloc[device]++;
        if (reserved[device] > reserved_peak[device]) reserved_peak[device] = reserved[device];
        trace(device, "segment_alloc", p, n, stream);
    }
    b->live = 1;
    b->requested = (size_t)size;
    b->stream = stream;
    allocated[device] += n;
    num_alloc[device]++;
    if (allocated[device] > allocated_peak[device]) allocated_peak[device] = allocated[device];
    trace(device, "alloc", b->ptr, n, stream);
    pthread_mutex_unlock(&mu);
    return b->ptr;
}

void bufferheap_free(void *ptr, ssize_t size, int device, void *stream) {
    (void)size; (void)device; (void)stream;
    pthread_mutex_lock(&mu);
    for (Block *b = blocks; b; b = b->next) {
        if (b->ptr == ptr && b->live) {
            b->live = 0;
            allocated[b->device] -= b->size;
            trace(b->device, "free_requested", ptr, b->size, b->stream);
            trace(b->device, "free_completed", ptr, b->size, b->stream);
            break;
        }
    }
    pthread_mutex_unlock(&mu);
}

static void release_cached(int device) {
    Block **link = &blocks;
    while (*link) {
        Block *b = *link;
        if (!b->live && (device < 0 || b->device == device)) {
            raw_free(b->ptr);
            reserved[b->device] -= b->size;
            trace(b->device, "segment_free", b->ptr, b->size, b->stream);
            *link = b->next;
            free(b);
        } else {
            link = &b->next;
        }
    }
}

void bufferheap_init(int device_count) { (void)device_count; init_count++; }
void bufferheap_reset(void) { pthread_mutex_lock(&mu); reset_count++; release_cached(-1); pthread_mutex_unlock(&mu); }
void bufferheap_set_memory_fraction(double f, int device) { if (device >= 0 && device < MAX_DEVICES) fraction[device] = f; }
void bufferheap_record_stream(void *ptr, void *stream) { (void)ptr; (void)stream; record_stream_count++; }

void *bufferheap_base_alloc(void *ptr, size_t *size) {
    void *base = NULL;
    pthread_mutex_lock(&mu);
    for (Block *b = blocks; b; b = b->next) {
        if (b->live && (char *)ptr >= (char *)b->ptr && (char *)ptr < (char *)b->ptr + b->size) {
            base = b->ptr;
            if (size) *size = b->size;
        }
    }
    pthread_mutex_unlock(&mu);
    return base;
}

const char *bufferheap_last_error(void) { return last_error; }
int bufferheap_initialized(void) { return any_device; }
void bufferheap_string_free(char *s) { free(s); }

int bufferheap_configure(const char *key, const char *value) {
    if (!key || !value) { set_error("null key or value"); return 1; }
    if (any_device) { set_error("configure(%s) must come before the first allocation", key); configured_after_use = 1; return 1; }
    if (!strcmp(key, "policy")) {
        if (strcmp(value, "default") && strcmp(value, "mps")) { set_error("unknown policy '%s'", value); return 1; }
        snprintf(policy, sizeof policy, "%s", value);
    } else if (!strcmp(key, "low_watermark_ratio") || !strcmp(key, "high_watermark_ratio")) {
        char *end;
        double r = strtod(value, &end);
        if (*end || r < 0 || !isfinite(r)) { set_error("invalid %s '%s'", key, value); return 1; }
        if (key[0] == 'l') low_ratio = r; else high_ratio = r;
    } else if (!strcmp(key, "debug")) {
        debug_flags = atoi(value);
    } else {
        set_error("unknown configuration key '%s'", key);
        return 1;
    }
    return 0;
}

/* All or nothing, as the real library: on a refused line the earlier ones are undone. */
int bufferheap_configure_all(const char *settings) {
    if (!settings) { set_error("null settings"); return 1; }
    char saved_policy[sizeof policy];
    memcpy(saved_policy, policy, sizeof policy);
    double saved_low = low_ratio, saved_high = high_ratio;
    int saved_debug = debug_flags;
    char line[256];
    const char *p = settings;
    while (*p) {
        size_t n = strcspn(p, "\n");
        if (n >= sizeof line) { set_error("setting too long"); goto undo; }
        memcpy(line, p, n);
        line[n] = 0;
        p += n + (p[n] == '\n');
        if (!n) continue;
        char *eq = strchr(line, '=');
        if (!eq) { set_error("not key=value: '%s'", line); goto undo; }
        *eq = 0;
        if (bufferheap_configure(line, eq + 1)) goto undo;
    }
    return 0;
undo:
    memcpy(policy, saved_policy, sizeof policy);
    low_ratio = saved_low; high_ratio = saved_high; debug_flags = saved_debug;
    return 1;
}

static int check_device(int device) {
    if (device < -1 || device >= MAX_DEVICES) { set_error("invalid device %d", device); return 1; }
    return 0;
}

int bufferheap_empty_cache(int device) {
    if (check_device(device)) return 1;
    pthread_mutex_lock(&mu);
    release_cached(device);
    pthread_mutex_unlock(&mu);
    return 0;
}

int bufferheap_reset_peak(int device) {
    if (check_device(device)) return 1;
    pthread_mutex_lock(&mu);
    for (int d = 0; d < MAX_DEVICES; d++) {
        if (device == -1 || device == d) { allocated_peak[d] = allocated[d]; reserved_peak[d] = reserved[d]; }
    }
    pthread_mutex_unlock(&mu);
    return 0;
}

int bufferheap_set_watermarks(int device, double low, double high) {
    if (check_device(device) || device < 0) { set_error("invalid device %d", device); return 1; }
    if (low < 0 || high < 0 || (high > 0 && low > high)) { set_error("invalid watermarks low=%g high=%g", low, high); return 1; }
    low_ratio = low;
    high_ratio = high;
    return 0;
}

/* A growing string for the JSON answers. */
typedef struct { char *s; size_t len, cap; } Buf;
static void put(Buf *b, const char *fmt, ...) {
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int n = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (b->s && b->len + (size_t)n < b->cap) { b->len += (size_t)n; return; }
        b->cap = (b->cap + (size_t)n + 1) * 2;
        b->s = realloc(b->s, b->cap);
    }
}

char *bufferheap_stats_json(int device) {
    if (device < 0 || device >= MAX_DEVICES) { set_error("invalid device %d", device); return NULL; }
    Buf b = {0};
    pthread_mutex_lock(&mu);
    put(&b, "{\"allocated_bytes.all.current\": %lld, \"allocated_bytes.all.peak\": %lld, "
            "\"reserved_bytes.all.current\": %lld, \"reserved_bytes.all.peak\": %lld, "
            "\"allocation.all.allocated\": %lld, \"num_device_alloc\": %lld, "
            "\"num_alloc_retries\": 0, \"num_ooms\": %lld, "
            "\"fake.init_calls\": %d, \"fake.reset_calls\": %d, \"fake.record_stream_calls\": %d, "
            "\"fake.memory_fraction\": %g, \"fake.low_watermark_ratio\": %g, \"fake.high_watermark_ratio\": %g, "
            "\"fake.debug\": %d, \"fake.policy\": \"%s\"}",
        allocated[device], allocated_peak[device], reserved[device], reserved_peak[device],
        num_alloc[device], num_device_alloc[device], num_ooms[device],
        init_count, reset_count, record_stream_count, fraction[device], low_ratio, high_ratio,
        debug_flags, policy);
    pthread_mutex_unlock(&mu);
    return b.s;
}

/* Segments without the derived sizes, so that the Python side fills them in. Device -1: every
   device up to the highest one used, each segment naming its device, one trace per device. */
char *bufferheap_snapshot_json(int device) {
    if (device < -1 || device >= MAX_DEVICES) { set_error("invalid device %d", device); return NULL; }
    Buf b = {0};
    int first = 1;
    pthread_mutex_lock(&mu);
    int lo = device < 0 ? 0 : device, hi = device < 0 ? 0 : device;
    if (device < 0) {
        for (Block *x = blocks; x; x = x->next) if (x->device > hi) hi = x->device;
        for (int d = 0; d < MAX_DEVICES; d++) if (ntrace[d] && d > hi) hi = d;
    }
    put(&b, "{\"segments\": [");
    for (Block *x = blocks; x; x = x->next) {
        if (x->device < lo || x->device > hi) continue;
        put(&b, "%s{\"device\": %d, \"address\": %llu, \"total_size\": %zu, \"stream\": %llu, \"segment_type\": \"%s\", "
                "\"segment_pool_id\": [0, 0], \"blocks\": [{\"address\": %llu, \"size\": %zu, "
                "\"requested_size\": %zu, \"state\": \"%s\"}]}",
            first ? "" : ", ", x->device, (unsigned long long)(uintptr_t)x->ptr, x->size,
            (unsigned long long)(uintptr_t)x->stream, x->size <= (1 << 20) ? "small" : "large",
            (unsigned long long)(uintptr_t)x->ptr, x->size, x->live ? x->requested : 0,
            x->live ? "active_allocated" : "inactive");
        first = 0;
    }
    put(&b, "], \"device_traces\": [");
    for (int d = lo; d <= hi; d++) {
        put(&b, "%s[", d > lo ? ", " : "");
        for (int i = 0; i < ntrace[d]; i++) {
            Trace *t = &traces[d][i];
            put(&b, "%s{\"action\": \"%s\", \"addr\": %llu, \"size\": %zu, \"stream\": %llu, \"time_us\": %lld}",
                i ? ", " : "", t->action, (unsigned long long)t->addr, t->size,
                (unsigned long long)(uintptr_t)t->stream, t->time_us);
        }
        put(&b, "]");
    }
    put(&b, "]}");
    pthread_mutex_unlock(&mu);
    return b.s;
}
