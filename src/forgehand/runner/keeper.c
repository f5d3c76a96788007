/*
 * forgehand-keeper: the process that owns every run's process, pipes and journal.
 *
 * The runner's keeper, journal writer and daemon supervisor in one static program. Its
 * journals are read by JournalReader (journal.py), and it speaks the protocol of
 * KeeperClient (keeper_client.py). It replaced a Python keeper, a fork of the daemon that
 * cost each sandbox ~5 MB; this one holds ~60 kB of memory of its own plus the pages of
 * its binary it touches, which every keeper of that file shares.
 *
 * Why a separate process: the daemon (gRPC, attach streams) may be killed at any moment,
 * even with SIGKILL, and no run may notice. The keeper runs in its own session, is started
 * by the first daemon on a state dir, and is found again by the next one through its
 * socket <state_dir>/keeper.sock. It is a single-threaded epoll loop that starts commands
 * with fork + execve (the keeper is small, so fork is cheap).
 *
 * What it does per run: spawn the command in a new session (its process group is the
 * run's) -> Started -> pump output into the journal, feed stdin, enforce the timeout and
 * the output limit, obey control frames -> on exit kill what is left of the process
 * group, drain the pipes -> Exited. Output from pipes is moved into the journal with
 * splice: the bytes go from the pipe to the journal's page cache without passing through
 * the keeper. A terminal cannot be spliced, nor can some file systems; then the keeper
 * reads and writes. The keeper is every run's child subreaper and reaps with wait4, so
 * every exit comes with its resource usage.
 *
 * Wire protocol with the daemon, on one connection, frames
 * "u8 kind | u32 id | u32 length | payload" (little-endian). Requests (id > 0) get exactly
 * one reply with the same id: O (ok, payload depends on the request) or X (error
 * message). Frames with id 0 are notifications: N with newline-separated run ids whose
 * journal grew, and "!<run id>" for runs that ended. A frame over 64 MiB drops its
 * connection.
 *
 *     S start   payload: serialized KeeperStart       -> O: pid (ascii; "0": it failed)
 *     I stdin   run_id NUL eof-flag-byte data          -> O once the data is in the pipe
 *                                                         (and, with the flag, stdin is
 *                                                         closed)
 *     R resize  run_id NUL u16 rows u16 cols           -> O
 *     C cancel  run_id NUL f64 grace                   -> O: "1" if it was running
 *     L live    (empty)                                -> O: newline-separated run ids
 *
 * A step run's fd 3 carries the engine's events as frames "u32 length | StepEvent"; each
 * valid one becomes an Event.step record, an invalid one is dropped.
 *
 * Journal (see journal.py for the reader's side): segments seg-%020llu.log of records
 * "u32 word | u32 crc32 | u64 seq | payload", the payload a serialized Event encoded here
 * by hand; the word holds the length (low 26 bits) and P, how much of the payload the
 * crc covers (top 6 bits; 0 = all of it). Whole middle segments are dropped to keep a
 * journal under its cap (truncations.bin records what went); exit.rec holds the Exited
 * record in space reserved when the run began.
 *
 * Modes:
 *   forgehand-keeper serve --state-dir DIR --journal-max-bytes N [--memory-events PATH]
 *       detach (fork; the first process exits 0), lock the state dir, write "ready\n"
 *       (or "busy\n": another keeper holds it) to fd 1, close it, serve until idle for
 *       60 s with no daemon connected and no run.
 *   forgehand-keeper supervise ... -- DAEMON_ARGV...
 *       be the keeper and the daemon's supervisor (the process a sandbox runs): start the
 *       daemon as a child, restart it when it crashes, stop on SIGTERM.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <malloc.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define KEEPER_COMM "forgehand-keep" /* the host finds keepers by this comm (15 bytes max) */
#define FRAME_HEADER 9
#define MAX_FRAME_BYTES (64u << 20)   /* a larger frame from a daemon drops its connection */
#define CONN_READ_BYTES 16384
#define READ_BYTES (1024 * 1024)
#define PIPE_BYTES (1024 * 1024)
#define DEFAULT_GRACE 2.0
#define ANNOUNCE_DELAY 0.002
#define DRAIN_SECONDS 2.0
#define IDLE_EXIT_SECONDS 60.0
#define DEFAULT_PATH "/usr/local/bin:/usr/bin:/bin"

#define LENGTH_BITS 26
#define MAX_RECORD_BYTES ((1u << LENGTH_BITS) - 1)
#define MAX_PREFIX_CRC 63
#define MAX_STEP_FRAME ((1u << LENGTH_BITS) - 64) /* leaves room for the Event around it */
#define RECORD_HEADER 16
#define EXIT_RESERVE_BYTES 4096
#define MAX_SEGMENT_BYTES (4u * 1024 * 1024)
#define MIN_SEGMENT_BYTES (64u * 1024)

#define MAX_RESTARTS 5
#define RESTART_WINDOW_SECONDS 60.0
#define STOP_GRACE_SECONDS 2.0
#define SETTINGS_EXIT 2
#define GAVE_UP_EXIT 1

enum stream { STREAM_STDOUT = 1, STREAM_STDERR = 2, STREAM_PTY = 3, STEP_EVENTS = -1 };
enum reason {
	REASON_EXITED = 1, REASON_SIGNALLED, REASON_TIMEOUT, REASON_OOM,
	REASON_LIMIT, REASON_CANCELLED, REASON_LOST, REASON_ERROR,
};

static const char MSG_DISK_FULL[] = "journal disk full: the run was stopped";
enum { TOO_BIG = 4096 }; /* not an errno: a record over MAX_RECORD_BYTES, refused by us */
static const char MSG_TOO_BIG[] = "an event exceeded the journal's record size: the run was stopped";

/* ---- small utilities ---------------------------------------------------------------- */

/* One line on stderr, "who: message". */
static void vreport(const char *who, const char *fmt, va_list ap)
{
	char text[1024];
	vsnprintf(text, sizeof text, fmt, ap);
	dprintf(2, "%s: %s\n", who, text);
}

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vreport("forgehand-keeper", fmt, ap);
	va_end(ap);
	exit(1);
}

static void *xrealloc(void *p, size_t n)
{
	void *q = realloc(p, n ? n : 1);
	if (!q)
		die("out of memory (%zu bytes)", n);
	return q;
}

static char *xstrndup(const void *p, size_t n)
{
	char *s = xrealloc(NULL, n + 1);
	if (n)
		memcpy(s, p, n);
	s[n] = 0;
	return s;
}

static double monotonic(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t time_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint32_t le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put_le32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static void put_le64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static int set_nonblocking(int fd)
{
	int flags = fcntl(fd, F_GETFL);
	return flags < 0 ? -1 : fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

/* A growable byte buffer; memory is taken when needed and given back by buf_free. */
struct buf {
	uint8_t *data;
	size_t len, cap;
};

static void buf_reserve(struct buf *b, size_t extra)
{
	if (b->cap - b->len >= extra)
		return;
	size_t need = b->len + extra, cap = 2 * b->cap;
	cap = cap < need ? need : cap < 64 ? 64 : cap; /* a large frame gets what it needs */
	b->data = xrealloc(b->data, cap);
	b->cap = cap;
}

static void buf_add(struct buf *b, const void *p, size_t n)
{
	if (!n)
		return;
	buf_reserve(b, n);
	memcpy(b->data + b->len, p, n);
	b->len += n;
}

static void buf_str(struct buf *b, const char *s) { buf_add(b, s, strlen(s)); }
static void buf_byte(struct buf *b, uint8_t c) { buf_add(b, &c, 1); }

static void buf_consume(struct buf *b, size_t n)
{
	memmove(b->data, b->data + n, b->len - n);
	b->len -= n;
}

static void buf_free(struct buf *b)
{
	free(b->data);
	b->data = NULL;
	b->len = b->cap = 0;
}

static const char *buf_cstr(struct buf *b)
{
	buf_reserve(b, 1);
	b->data[b->len] = 0;
	return (const char *)b->data;
}

/* dir/name, malloc'd (paths live on the heap: PATH_MAX arrays would grow the stack). */
static char *path_of(const char *dir, const char *name)
{
	struct buf path = {0};
	buf_str(&path, dir);
	buf_byte(&path, '/');
	buf_str(&path, name);
	buf_cstr(&path);
	return (char *)path.data;
}

/* ---- crc32: zlib's (reflected 0xEDB88320), chained like zlib.crc32(data, previous) ----- */

static uint32_t crc_table[256];

static void crc_init(void)
{
	for (uint32_t n = 0; n < 256; n++) {
		uint32_t c = n;
		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		crc_table[n] = c;
	}
}

static uint32_t crc32_update(uint32_t crc, const void *data, size_t n)
{
	const uint8_t *p = data;
	crc = ~crc;
	while (n--)
		crc = crc_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
	return ~crc;
}

/* ---- UTF-8 and Python's repr (messages quote names as the Python keeper's !r did) ----- */

/* The code point at s (which holds a valid sequence); *len gets its length. */
static uint32_t utf8_decode(const uint8_t *s, size_t n, size_t *len)
{
	uint8_t c = s[0];
	size_t want = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
	uint32_t cp = want == 1 ? c : want == 2 ? (c & 0x1Fu) : want == 3 ? (c & 0x0Fu) : (c & 0x07u);
	if (want > n)
		return *len = 1, 0xFFFD;
	for (size_t k = 1; k < want; k++)
		cp = cp << 6 | (s[k] & 0x3Fu);
	*len = want;
	return cp;
}

/* Strict UTF-8, as protobuf (upb) checks string fields: no overlongs, no surrogates. */
static bool utf8_valid(const uint8_t *s, size_t n)
{
	for (size_t i = 0; i < n;) {
		uint8_t c = s[i];
		size_t len = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3
		    : (c & 0xF8) == 0xF0 ? 4 : 0;
		static const uint32_t least[] = {0, 0, 0x80, 0x800, 0x10000};
		if (!len || n - i < len)
			return false;
		for (size_t k = 1; k < len; k++)
			if ((s[i + k] & 0xC0) != 0x80)
				return false;
		size_t got;
		uint32_t cp = utf8_decode(s + i, n - i, &got);
		if (cp < least[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
			return false;
		i += len;
	}
	return true;
}

/* str.isprintable for a non-ASCII code point: an approximation of Unicode's categories
 * Cc, Cf, Co, Cs, Zl, Zp, Zs (unassigned code points are taken as printable). */
static bool py_printable(uint32_t cp)
{
	static const uint32_t unprintable[][2] = {
	    {0x80, 0xA0}, {0xAD, 0xAD}, {0x600, 0x605}, {0x61C, 0x61C}, {0x6DD, 0x6DD},
	    {0x70F, 0x70F}, {0x1680, 0x1680}, {0x180E, 0x180E}, {0x2000, 0x200F},
	    {0x2028, 0x202F}, {0x205F, 0x206F}, {0x3000, 0x3000}, {0xD800, 0xF8FF},
	    {0xFEFF, 0xFEFF}, {0xFFF9, 0xFFFB}, {0xE0001, 0xE0001}, {0xE0020, 0xE007F},
	    {0xF0000, 0x10FFFF},
	};
	for (size_t i = 0; i < sizeof unprintable / sizeof unprintable[0]; i++)
		if (cp >= unprintable[i][0] && cp <= unprintable[i][1])
			return false;
	return true;
}

/* repr() of a str given as valid UTF-8. */
static void buf_repr(struct buf *b, const uint8_t *s, size_t n)
{
	char quote = n && memchr(s, '\'', n) && !memchr(s, '"', n) ? '"' : '\'';
	char esc[16];
	buf_byte(b, (uint8_t)quote);
	for (size_t i = 0, len; i < n; i += len) {
		uint32_t cp = utf8_decode(s + i, n - i, &len);
		if (cp == (uint32_t)quote || cp == '\\') {
			buf_byte(b, '\\');
			buf_byte(b, (uint8_t)cp);
		} else if (cp == '\t' || cp == '\n' || cp == '\r') {
			buf_str(b, cp == '\t' ? "\\t" : cp == '\n' ? "\\n" : "\\r");
		} else if (cp < 0x20 || cp == 0x7F || (cp >= 0x80 && !py_printable(cp))) {
			snprintf(esc, sizeof esc, cp < 0x100 ? "\\x%02x" : cp < 0x10000 ? "\\u%04x" : "\\U%08x", cp);
			buf_str(b, esc);
		} else {
			buf_add(b, s + i, len);
		}
	}
	buf_byte(b, (uint8_t)quote);
}

/* ---- protobuf: encoding by hand, and a small reader ----------------------------------- */

static size_t varint_put(uint8_t *out, uint64_t v)
{
	size_t n = 0;
	while (v > 0x7F) {
		out[n++] = (uint8_t)(v & 0x7F) | 0x80;
		v >>= 7;
	}
	out[n++] = (uint8_t)v;
	return n;
}

static void buf_varint(struct buf *b, uint64_t v)
{
	uint8_t tmp[10];
	buf_add(b, tmp, varint_put(tmp, v));
}

/* proto3 fields with implicit presence: a zero value is left out. */
static void pb_varint_field(struct buf *b, int field, uint64_t v)
{
	if (!v)
		return;
	buf_varint(b, (uint64_t)field << 3);
	buf_varint(b, v);
}

static void pb_int32_field(struct buf *b, int field, int32_t v)
{
	pb_varint_field(b, field, (uint64_t)(int64_t)v); /* negatives: 10-byte varints */
}

static void pb_double_field(struct buf *b, int field, double v)
{
	uint64_t bits;
	uint8_t raw[8];
	memcpy(&bits, &v, sizeof bits);
	if (!bits)
		return;
	buf_varint(b, (uint64_t)field << 3 | 1);
	put_le64(raw, bits);
	buf_add(b, raw, 8);
}

static void pb_bytes_field(struct buf *b, int field, const void *p, size_t n, bool always)
{
	if (!n && !always)
		return;
	buf_varint(b, (uint64_t)field << 3 | 2);
	buf_varint(b, n);
	buf_add(b, p, n);
}

struct pbr {
	const uint8_t *p, *end;
};

static bool pb_read_varint(struct pbr *r, uint64_t *v)
{
	uint64_t value = 0;
	for (int i = 0; i < 10; i++) {
		if (r->p >= r->end)
			return false;
		uint8_t c = *r->p++;
		value |= (uint64_t)(c & 0x7F) << (7 * i);
		if (!(c & 0x80))
			return *v = value, true;
	}
	return false;
}

/* The next field's tag; NULL or an error. */
static const char *pb_read_tag(struct pbr *r, uint32_t *field, int *wire)
{
	uint64_t tag;
	if (!pb_read_varint(r, &tag))
		return "a truncated varint";
	if (tag > UINT32_MAX || (tag >> 3) == 0)
		return "an invalid field number";
	*field = (uint32_t)(tag >> 3);
	*wire = (int)(tag & 7);
	return NULL;
}

static const char *pb_read_bytes(struct pbr *r, const uint8_t **p, size_t *n)
{
	uint64_t len;
	if (!pb_read_varint(r, &len))
		return "a truncated varint";
	if (len > (uint64_t)(r->end - r->p))
		return "a length beyond the end";
	*p = r->p;
	*n = (size_t)len;
	r->p += len;
	return NULL;
}

/* Skip a field's value of any wire type (groups included); NULL or an error. */
static const char *pb_skip(struct pbr *r, uint32_t field, int wire, int depth)
{
	uint64_t v;
	const uint8_t *p;
	size_t n;
	switch (wire) {
	case 0:
		return pb_read_varint(r, &v) ? NULL : "a truncated varint";
	case 1:
	case 5:
		n = wire == 1 ? 8 : 4;
		if ((size_t)(r->end - r->p) < n)
			return "a truncated fixed-size field";
		r->p += n;
		return NULL;
	case 2:
		return pb_read_bytes(r, &p, &n);
	case 3:
		if (depth > 64)
			return "groups nested too deep";
		for (;;) {
			uint32_t inner;
			int inner_wire;
			const char *err = pb_read_tag(r, &inner, &inner_wire);
			if (err)
				return err;
			if (inner_wire == 4)
				return inner == field ? NULL : "an unmatched end of group";
			if ((err = pb_skip(r, inner, inner_wire, depth + 1)))
				return err;
		}
	default:
		return "an invalid wire type";
	}
}

/* ---- KeeperStart (runner.proto): what the daemon tells the keeper about a run ---------- */

struct slice {
	const uint8_t *p;
	size_t n;
};

struct slices {
	struct slice *items;
	size_t n, cap;
};

/* Whether the slice holds byte c (an absent field is an empty slice with no pointer). */
static bool contains(struct slice s, int c)
{
	return s.n && memchr(s.p, c, s.n);
}

static void slices_add(struct slices *s, const uint8_t *p, size_t n)
{
	if (s->n == s->cap) {
		s->cap = s->cap ? 2 * s->cap : 8;
		s->items = xrealloc(s->items, s->cap * sizeof *s->items);
	}
	s->items[s->n++] = (struct slice){p, n};
}

struct keeper_start {
	struct slice run_id, request, cwd, stdin_data;
	struct slices argv, env;
	bool pty, stdin_pipe, stdin_close, step_events;
	uint32_t pty_rows, pty_cols;
	double timeout, grace;
	uint64_t max_output, journal_max;
};

enum { WIRE_VARINT = 0, WIRE_FIXED64 = 1, WIRE_LEN = 2 };

/* Wire types of KeeperStart's fields 1-16, and which of them are strings. */
static const int START_WIRE[17] = {-1, 2, 2, 2, 2, 2, 0, 0, 0, 0, 2, 0, 0, 1, 1, 0, 0};
static const bool START_STRING[17] = {[1] = true, [3] = true, [4] = true, [5] = true};

static double pb_double_value(const uint8_t *p)
{
	uint64_t bits = 0;
	double v;
	for (int i = 7; i >= 0; i--)
		bits = bits << 8 | p[i];
	memcpy(&v, &bits, sizeof v);
	return v;
}

static void start_set_scalar(struct keeper_start *ks, uint32_t field, uint64_t v)
{
	switch (field) {
	case 6: ks->pty = v != 0; break;
	case 7: ks->pty_rows = (uint32_t)v; break;
	case 8: ks->pty_cols = (uint32_t)v; break;
	case 9: ks->stdin_pipe = v != 0; break;
	case 11: ks->stdin_close = v != 0; break;
	case 12: ks->step_events = v != 0; break;
	case 15: ks->max_output = v; break;
	case 16: ks->journal_max = v; break;
	}
}

static void start_set_bytes(struct keeper_start *ks, uint32_t field, const uint8_t *p, size_t n)
{
	switch (field) {
	case 1: ks->run_id = (struct slice){p, n}; break;
	case 2: ks->request = (struct slice){p, n}; break;
	case 3: slices_add(&ks->argv, p, n); break;
	case 4: slices_add(&ks->env, p, n); break;
	case 5: ks->cwd = (struct slice){p, n}; break;
	case 10: ks->stdin_data = (struct slice){p, n}; break;
	}
}

/* Parse one known field of the wire type START_WIRE says; NULL or an error. */
static const char *start_field(struct keeper_start *ks, struct pbr *r, uint32_t field)
{
	uint64_t v;
	const uint8_t *p;
	size_t n;
	const char *err;
	switch (START_WIRE[field]) {
	case WIRE_VARINT:
		if (!pb_read_varint(r, &v))
			return "a truncated varint";
		start_set_scalar(ks, field, v);
		return NULL;
	case WIRE_FIXED64:
		if (r->end - r->p < 8)
			return "a truncated fixed-size field";
		if (field == 13)
			ks->timeout = pb_double_value(r->p);
		else
			ks->grace = pb_double_value(r->p);
		r->p += 8;
		return NULL;
	default:
		if ((err = pb_read_bytes(r, &p, &n)))
			return err;
		if (START_STRING[field] && !utf8_valid(p, n))
			return "a string that is not UTF-8";
		start_set_bytes(ks, field, p, n);
		return NULL;
	}
}

static void start_free(struct keeper_start *ks)
{
	free(ks->argv.items);
	free(ks->env.items);
}

/* Decode a KeeperStart; its slices point into data. NULL or what is wrong. */
static const char *start_decode(struct keeper_start *ks, const uint8_t *data, size_t n)
{
	struct pbr r = {data, data + n};
	memset(ks, 0, sizeof *ks);
	while (r.p < r.end) {
		uint32_t field;
		int wire;
		const char *err = pb_read_tag(&r, &field, &wire);
		if (!err && field <= 16 && wire != START_WIRE[field])
			err = "a field with the wrong wire type";
		if (!err)
			err = field <= 16 ? start_field(ks, &r, field) : pb_skip(&r, field, wire, 0);
		if (err)
			return err;
	}
	return NULL;
}

static bool run_id_valid(struct slice id)
{
	if (id.n < 1 || id.n > 128)
		return false;
	for (size_t i = 0; i < id.n; i++) {
		char c = (char)id.p[i];
		bool alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
		if (!alnum && (i == 0 || (c != '.' && c != '_' && c != '-')))
			return false;
	}
	return true;
}

/* What is wrong with a decoded request, into *err (empty: nothing). */
static void start_validate(const struct keeper_start *ks, struct buf *err)
{
	if (!run_id_valid(ks->run_id)) {
		buf_str(err, "invalid run_id ");
		buf_repr(err, ks->run_id.p, ks->run_id.n);
		buf_str(err, ": it must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}");
		return;
	}
	if (!ks->argv.n)
		return buf_str(err, "argv is empty");
	for (size_t i = 0; i < ks->argv.n; i++)
		if (contains(ks->argv.items[i], 0))
			return buf_str(err, "argv holds a NUL character");
	for (size_t i = 0; i < ks->env.n; i++) {
		struct slice e = ks->env.items[i];
		if (contains(e, 0))
			return buf_str(err, "env holds a NUL character");
		if (!contains(e, '=')) {
			buf_str(err, "env entry ");
			buf_repr(err, e.p, e.n);
			return buf_str(err, " has no '='");
		}
	}
	if (contains(ks->cwd, 0))
		return buf_str(err, "cwd holds a NUL character");
	if (ks->pty_rows > 0xFFFF || ks->pty_cols > 0xFFFF)
		return buf_str(err, "pty_rows and pty_cols must be below 65536");
}

/* A StepEvent frame from fd 3 is recorded only if Python's reader will parse it: known
 * fields with their wire types, UTF-8 strings. */
static bool step_event_valid(const uint8_t *data, size_t n)
{
	struct pbr r = {data, data + n};
	while (r.p < r.end) {
		uint32_t field;
		int wire;
		uint64_t v;
		const uint8_t *p;
		size_t len;
		if (pb_read_tag(&r, &field, &wire) || field > 7)
			return false;
		bool varint = field == 1 || field == 5;
		if (wire != (varint ? WIRE_VARINT : WIRE_LEN))
			return false;
		if (varint ? !pb_read_varint(&r, &v) : pb_read_bytes(&r, &p, &len) || !utf8_valid(p, len))
			return false;
	}
	return true;
}

/* ---- the journal writer (journal.py's JournalWriter) --------------------------------- */

struct segment {
	uint64_t first_seq, last_seq, size, output_bytes;
	bool head; /* written while the journal was under half its cap: never dropped */
};

struct journal {
	char *dir;
	uint64_t max_bytes, segment_bytes, next_seq, total_bytes;
	struct segment *segs;
	size_t nsegs, segs_cap;
	int fd, exit_fd; /* the newest segment; exit.rec */
};

static char *segment_path(const struct journal *j, uint64_t first_seq)
{
	char name[32];
	snprintf(name, sizeof name, "seg-%020llu.log", (unsigned long long)first_seq);
	return path_of(j->dir, name);
}

static struct segment *jw_last(struct journal *j) { return &j->segs[j->nsegs - 1]; }

static int jw_open_segment(struct journal *j, uint64_t first_seq)
{
	struct stat st;
	char *path = segment_path(j, first_seq);
	bool head = j->total_bytes < j->max_bytes / 2;
	/* Not O_APPEND: splice refuses such a target. Records go at explicit offsets, the
	 * segment's size, which only this writer changes. */
	j->fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
	free(path);
	if (j->fd < 0 || fstat(j->fd, &st) < 0)
		return -errno;
	j->total_bytes += (uint64_t)st.st_size;
	if (j->nsegs == j->segs_cap) {
		j->segs_cap = j->segs_cap ? 2 * j->segs_cap : 4;
		j->segs = xrealloc(j->segs, j->segs_cap * sizeof *j->segs);
	}
	j->segs[j->nsegs++] = (struct segment){.first_seq = first_seq, .size = (uint64_t)st.st_size, .head = head};
	return 0;
}

static void jw_close(struct journal *j)
{
	int fds[2] = {j->fd, j->exit_fd};
	for (int i = 0; i < 2; i++) {
		if (fds[i] >= 0) {
			fsync(fds[i]);
			close(fds[i]);
		}
	}
	j->fd = j->exit_fd = -1;
	free(j->segs);
	free(j->dir);
	j->segs = NULL;
	j->dir = NULL;
}

static int jw_open(struct journal *j, const char *dir, uint64_t max_bytes)
{
	memset(j, 0, sizeof *j);
	j->fd = j->exit_fd = -1;
	j->next_seq = 1;
	j->max_bytes = max_bytes;
	/* Small enough that a resumed reader finds its place quickly, large enough that the
	 * middle is dropped in useful pieces. */
	uint64_t seg = max_bytes / 16;
	j->segment_bytes = seg < MIN_SEGMENT_BYTES ? MIN_SEGMENT_BYTES : seg > MAX_SEGMENT_BYTES ? MAX_SEGMENT_BYTES : seg;
	j->dir = xstrndup(dir, strlen(dir));
	if (mkdir(dir, 0777) < 0 && errno != EEXIST)
		return -errno;
	char *path = path_of(dir, "exit.rec");
	j->exit_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	free(path);
	if (j->exit_fd < 0)
		return -errno;
	int rc = posix_fallocate(j->exit_fd, 0, EXIT_RESERVE_BYTES);
	if (rc)
		return -rc;
	return jw_open_segment(j, j->next_seq);
}

static void pack_header(uint8_t *h, uint32_t word, uint32_t crc, uint64_t seq)
{
	put_le32(h, word);
	put_le32(h + 4, crc);
	put_le64(h + 8, seq);
}

/* Append one record, or nothing: a short write (a disk that fills up) is cut off again
 * and reported as ENOSPC, so the journal only ever holds whole records. */
static int jw_write_whole(struct journal *j, const struct iovec *iov, int n, size_t size)
{
	if (j->fd < 0)
		return -ENOSPC; /* a rotation failed to open the next segment */
	off_t start = (off_t)jw_last(j)->size;
	ssize_t written = pwritev(j->fd, iov, n, start);
	if (written < 0)
		return -errno;
	if ((size_t)written != size) {
		if (ftruncate(j->fd, start) < 0) {
			/* nothing better to do: the record is reported lost either way */
		}
		return -ENOSPC;
	}
	return 0;
}

static int jw_append_truncation(struct journal *j, const struct segment *victim)
{
	uint8_t record[24];
	put_le64(record, victim->first_seq);
	put_le64(record + 8, victim->last_seq);
	put_le64(record + 16, victim->output_bytes);
	char *path = path_of(j->dir, "truncations.bin");
	int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0666);
	free(path);
	if (fd < 0)
		return -errno;
	ssize_t n = write(fd, record, sizeof record);
	int rc = n < 0 ? -errno : 0;
	close(fd);
	return rc;
}

/* Drop whole segments from the middle (not the head ones, not the newest) until the
 * journal is under its cap again. */
static int jw_drop_middle(struct journal *j)
{
	while (j->total_bytes > j->max_bytes) {
		size_t i = 0;
		while (i + 1 < j->nsegs && j->segs[i].head)
			i++;
		if (i + 1 >= j->nsegs)
			return 0;
		struct segment victim = j->segs[i];
		memmove(&j->segs[i], &j->segs[i + 1], (j->nsegs - i - 1) * sizeof *j->segs);
		j->nsegs--;
		char *path = segment_path(j, victim.first_seq);
		int rc = unlink(path) < 0 && errno != ENOENT ? -errno : 0;
		free(path);
		if (rc)
			return rc;
		j->total_bytes -= victim.size;
		if ((rc = jw_append_truncation(j, &victim)))
			return rc;
	}
	return 0;
}

static int jw_rotate(struct journal *j)
{
	close(j->fd);
	j->fd = -1;
	int rc = jw_open_segment(j, j->next_seq);
	return rc ? rc : jw_drop_middle(j);
}

static int jw_account(struct journal *j, uint64_t size, uint64_t seq, uint64_t output_bytes, bool rotate)
{
	struct segment *seg = jw_last(j);
	seg->size += size;
	seg->last_seq = seq;
	seg->output_bytes += output_bytes;
	j->total_bytes += size;
	if (rotate && seg->size >= j->segment_bytes)
		return jw_rotate(j);
	return 0;
}

static size_t iov_size(const struct iovec *iov, int n)
{
	size_t size = 0;
	for (int i = 0; i < n; i++)
		size += iov[i].iov_len;
	return size;
}

/* A record whose crc covers its whole payload (P = 0): its header into hdr. */
static int record_header(uint8_t *hdr, uint64_t seq, const struct iovec *payload, int n)
{
	size_t len = iov_size(payload, n);
	uint32_t crc = 0;
	if (len > MAX_RECORD_BYTES)
		return -TOO_BIG;
	for (int i = 0; i < n; i++)
		crc = crc32_update(crc, payload[i].iov_base, payload[i].iov_len);
	pack_header(hdr, (uint32_t)len, crc, seq);
	return 0;
}

/* The start of every Event: seq and time. */
static size_t event_head(uint8_t *out, uint64_t seq, uint64_t time)
{
	size_t n = 0;
	out[n++] = 0x08;
	n += varint_put(out + n, seq);
	out[n++] = 0x10;
	return n + varint_put(out + n, time);
}

/* Append an Event made of seq, the current time and body (the rest of the Event, in at
 * most MAX_BODY_PARTS pieces). */
#define MAX_BODY_PARTS 2
static int jw_append_event(struct journal *j, const struct iovec *body, int nbody, uint64_t output_bytes)
{
	uint64_t seq = j->next_seq;
	uint8_t hdr[RECORD_HEADER], head[24];
	struct iovec iov[2 + MAX_BODY_PARTS] = {{hdr, RECORD_HEADER}, {head, event_head(head, seq, time_ns())}};
	int n = 2 + (nbody < MAX_BODY_PARTS ? nbody : MAX_BODY_PARTS);
	memcpy(iov + 2, body, (size_t)(n - 2) * sizeof *iov);
	int rc = record_header(hdr, seq, iov + 1, n - 1);
	if (!rc)
		rc = jw_write_whole(j, iov, n, iov_size(iov, n));
	if (rc)
		return rc;
	j->next_seq = seq + 1;
	return jw_account(j, iov_size(iov, n), seq, output_bytes, true);
}

/* The serialized Output Event of size data bytes, up to where the data begins. */
static size_t output_prefix(uint8_t *out, uint64_t seq, int stream, size_t size)
{
	uint8_t output[16];
	size_t on = 0, n = event_head(out, seq, time_ns());
	output[on++] = 0x08;
	on += varint_put(output + on, (uint64_t)stream);
	output[on++] = 0x12;
	on += varint_put(output + on, size);
	out[n++] = 0x22;
	n += varint_put(out + n, on + size);
	memcpy(out + n, output, on);
	return n + on;
}

/* Header of an output record (into hp, followed by the prefix already there): its crc
 * covers the header's word and seq, the prefix and the data's first head bytes (P). */
static int output_header(uint8_t *hp, uint64_t seq, size_t prefix_len, size_t size,
			 const uint8_t *data, size_t head)
{
	size_t length = prefix_len + size;
	if (length > MAX_RECORD_BYTES)
		return -TOO_BIG;
	uint32_t word = (uint32_t)length | (uint32_t)(prefix_len + head) << LENGTH_BITS;
	uint8_t word_seq[12];
	put_le32(word_seq, word);
	put_le64(word_seq + 4, seq);
	uint32_t crc = crc32_update(0, word_seq, sizeof word_seq);
	crc = crc32_update(crc, hp + RECORD_HEADER, prefix_len);
	crc = crc32_update(crc, data, head);
	pack_header(hp, word, crc, seq);
	return 0;
}

/* An Output event of data, encoded here: the data is only copied into the file. */
static int jw_append_output(struct journal *j, int stream, const uint8_t *data, size_t n)
{
	uint64_t seq = j->next_seq;
	uint8_t hp[RECORD_HEADER + 48];
	size_t prefix_len = output_prefix(hp + RECORD_HEADER, seq, stream, n);
	size_t head = MAX_PREFIX_CRC - prefix_len < n ? MAX_PREFIX_CRC - prefix_len : n;
	int rc = output_header(hp, seq, prefix_len, n, data, head);
	struct iovec iov[2] = {{hp, RECORD_HEADER + prefix_len}, {(void *)data, n}};
	if (!rc)
		rc = jw_write_whole(j, iov, 2, RECORD_HEADER + prefix_len + n);
	if (rc)
		return rc;
	j->next_seq = seq + 1;
	return jw_account(j, RECORD_HEADER + prefix_len + n, seq, n, true);
}

static ssize_t jw_splice(struct journal *j, int pipe, uint64_t offset, uint64_t end)
{
	loff_t off = (loff_t)offset;
	/* The pipe holds the data; never wait for more. */
	return splice(pipe, NULL, j->fd, &off, (size_t)(end - offset), SPLICE_F_NONBLOCK);
}

/* Move end - offset bytes from the pipe to the segment at offset. The first splice's
 * error goes up as it is (nothing was taken); a short one is ENOSPC. */
static int jw_splice_all(struct journal *j, int pipe, uint64_t offset, uint64_t end)
{
	ssize_t moved = jw_splice(j, pipe, offset, end);
	if (moved < 0)
		return -errno;
	while (moved > 0 && offset + (uint64_t)moved < end) {
		offset += (uint64_t)moved;
		moved = jw_splice(j, pipe, offset, end);
		if (moved < 0)
			moved = 0;
	}
	return offset + (uint64_t)moved < end ? -ENOSPC : 0;
}

/* jw_append_output of the next size bytes of a pipe, which holds at least that many:
 * header and prefix are written, then the data is spliced and never enters this process.
 * -EINVAL or -ENOSYS: the journal's file system cannot splice (nothing was taken). */
static int jw_splice_output(struct journal *j, int stream, int pipe, size_t size)
{
	if (j->fd < 0)
		return -ENOSPC;
	uint64_t seq = j->next_seq;
	uint8_t hp[RECORD_HEADER + 48];
	size_t prefix_len = output_prefix(hp + RECORD_HEADER, seq, stream, size);
	size_t head_len = RECORD_HEADER + prefix_len;
	int rc = output_header(hp, seq, prefix_len, size, NULL, 0);
	if (rc)
		return rc;
	uint64_t start = jw_last(j)->size, end = start + head_len + size;
	ssize_t written = pwrite(j->fd, hp, head_len, (off_t)start);
	rc = written < 0 ? -errno : (size_t)written != head_len ? -ENOSPC : 0;
	if (!rc)
		rc = jw_splice_all(j, pipe, start + head_len, end);
	if (rc) {
		if (ftruncate(j->fd, (off_t)start) < 0) {
			/* the error below says what matters */
		}
		return rc;
	}
	j->next_seq = seq + 1;
	return jw_account(j, end - start, seq, size, true);
}

/* Append the final Exited event (body: the Event's exited field) and store the same
 * record in exit.rec. The exit record is written even when the append fails for lack of
 * space; nothing follows it (no rotation). */
static void jw_write_exit(struct journal *j, const struct buf *body)
{
	uint64_t seq = j->next_seq;
	uint8_t hdr[RECORD_HEADER], head[24];
	struct iovec iov[3] = {{hdr, RECORD_HEADER}, {head, event_head(head, seq, time_ns())},
			       {body->data, body->len}};
	if (record_header(hdr, seq, iov + 1, 2))
		return;
	size_t size = iov_size(iov, 3);
	if (!jw_write_whole(j, iov, 3, size)) {
		j->next_seq = seq + 1;
		jw_account(j, size, seq, 0, false);
	}
	if (pwritev(j->exit_fd, iov, 3, 0) != (ssize_t)size)
		dprintf(2, "forgehand-keeper: cannot write %s/exit.rec: %s\n", j->dir, strerror(errno));
}

/* ---- the keeper's state ------------------------------------------------------------- */

enum watch_kind { W_LISTENER, W_SIGNALS, W_CONN, W_OUTPUT, W_STDIN };

/* What an epoll registration points at. fd < 0: unregistered (a stale event is skipped).
 * Connections and outputs are freed at the end of a loop turn, so an event of the same
 * epoll_wait batch never points at freed memory. */
struct watch {
	int fd;
	enum watch_kind kind;
	struct watch *next_dead;
};

struct conn {
	struct watch w; /* first: freed through it */
	struct conn *next;
	struct buf in, out;
	size_t out_off;
	bool dead;
};

struct run;

struct output {
	struct watch w; /* first: freed through it */
	struct output *next;
	struct run *run;
	int stream;
};

struct waiter {
	struct conn *conn;
	uint32_t ident;
};

struct run {
	struct run *prev, *next;
	char *id;
	struct journal journal;
	double started;
	pid_t pid;
	struct output *outputs;
	int stdin_fd, pty_master;
	struct watch stdin_w; /* registered while stdin waits to be writable */
	struct buf stdin_queue; /* what stdin still has to take, from stdin_off on */
	size_t stdin_off;
	bool stdin_eof;
	struct waiter *waiters;
	size_t nwaiters, waiters_cap;
	int kill_reason;
	char kill_message[128];
	double term_at, kill_at, drain_until, announce_at;
	uint64_t output_bytes, oom_before;
	bool exited;
	int status;
	struct rusage rusage;
	struct buf step; /* an incomplete StepEvent frame */
	bool step_discard;
	bool splice; /* whether pipe output may be spliced into the journal */
	bool journal_failed; /* the journal takes nothing more: output is dropped */
	bool dirty, ended;
	/* from the request */
	bool pty, stdin_pipe;
	double timeout, grace;
	uint64_t max_output;
};

static struct keeper {
	const char *state_dir, *memory_events;
	uint64_t journal_max;
	int epfd, listen_fd, sig_fd;
	struct watch listen_w, sig_w;
	struct conn *conns;
	struct run *runs, *runs_tail; /* in start order (L lists them so) */
	struct watch *dead;
	double idle_since;
	bool may_reap, stopping, supervising;
} K;

/* The supervisor's state (supervise mode). */
static struct supervisor {
	char **argv;       /* the daemon's, NULL-terminated */
	char **first_argv; /* the first daemon's: argv + --ready-fd N */
	char **sockets;
	int nsockets, max_restarts, ready_fd;
	double *restarts;
	int nrestarts;
	pid_t daemon_pid, self;
	int exit_code;
	char reason[512];
} S;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vreport("forgehand-runner supervisor", fmt, ap);
	va_end(ap);
}

static void watch_add(struct watch *w, int fd, enum watch_kind kind, uint32_t events)
{
	struct epoll_event ev = {.events = events, .data.ptr = w};
	w->fd = fd;
	w->kind = kind;
	if (epoll_ctl(K.epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
		die("epoll_ctl: %s", strerror(errno));
}

static void watch_modify(struct watch *w, uint32_t events)
{
	struct epoll_event ev = {.events = events, .data.ptr = w};
	epoll_ctl(K.epfd, EPOLL_CTL_MOD, w->fd, &ev);
}

static void watch_remove(struct watch *w)
{
	if (w->fd >= 0)
		epoll_ctl(K.epfd, EPOLL_CTL_DEL, w->fd, NULL);
	w->fd = -1;
}

static void bury(struct watch *w)
{
	w->next_dead = K.dead;
	K.dead = w;
}

static void free_dead(void)
{
	while (K.dead) {
		struct watch *w = K.dead;
		K.dead = w->next_dead;
		if (w->kind == W_CONN) {
			buf_free(&((struct conn *)w)->in);
			buf_free(&((struct conn *)w)->out);
		}
		free(w);
	}
}

static struct run *find_run(const uint8_t *id, size_t n)
{
	for (struct run *r = K.runs; r; r = r->next)
		if (strlen(r->id) == n && (!n || !memcmp(r->id, id, n)))
			return r;
	return NULL;
}

/* ---- connections ---------------------------------------------------------------------- */

static void drop_conn(struct conn *c)
{
	if (c->dead)
		return;
	c->dead = true;
	int fd = c->w.fd;
	watch_remove(&c->w);
	close(fd);
	for (struct conn **p = &K.conns; *p; p = &(*p)->next) {
		if (*p == c) {
			*p = c->next;
			break;
		}
	}
	for (struct run *r = K.runs; r; r = r->next) {
		size_t kept = 0;
		for (size_t i = 0; i < r->nwaiters; i++)
			if (r->waiters[i].conn != c)
				r->waiters[kept++] = r->waiters[i];
		r->nwaiters = kept;
	}
	bury(&c->w);
}

/* Send a frame (header and payload; both may be empty, to send what waits) after what
 * still waits, keep what the socket does not take; epoll's write interest follows whether
 * anything waits. */
static void conn_send(struct conn *c, const uint8_t *head, size_t head_len, const void *payload, size_t n)
{
	if (c->dead)
		return;
	size_t waiting_before = c->out.len - c->out_off;
	struct iovec parts[3] = {{c->out.data + c->out_off, waiting_before}, {(void *)head, head_len},
				 {(void *)payload, n}};
	struct msghdr msg = {.msg_iov = parts, .msg_iovlen = 3};
	ssize_t sent = waiting_before + head_len + n ? sendmsg(c->w.fd, &msg, MSG_NOSIGNAL) : 0;
	if (sent < 0 && errno != EAGAIN && errno != EINTR)
		return drop_conn(c);
	size_t left = sent < 0 ? 0 : (size_t)sent;
	for (int i = 0; i < 3; i++) {
		size_t taken = left < parts[i].iov_len ? left : parts[i].iov_len;
		left -= taken;
		if (i == 0)
			c->out_off += taken;
		else
			buf_add(&c->out, (uint8_t *)parts[i].iov_base + taken, parts[i].iov_len - taken);
	}
	if (c->out_off == c->out.len) {
		buf_free(&c->out);
		c->out_off = 0;
	} else if (c->out_off > CONN_READ_BYTES && 2 * c->out_off > c->out.len) {
		buf_consume(&c->out, c->out_off);
		c->out_off = 0;
	}
	bool waiting = c->out.len > c->out_off;
	if (waiting != (waiting_before > 0))
		watch_modify(&c->w, EPOLLIN | (waiting ? EPOLLOUT : 0));
}

static void send_frame(struct conn *c, char kind, uint32_t ident, const void *payload, size_t n)
{
	uint8_t header[FRAME_HEADER];
	header[0] = (uint8_t)kind;
	put_le32(header + 1, ident);
	put_le32(header + 5, (uint32_t)n);
	conn_send(c, header, sizeof header, payload, n);
}

static void reply_ok(struct waiter w, const char *payload)
{
	send_frame(w.conn, 'O', w.ident, payload, strlen(payload));
}

static void reply_error(struct waiter w, const char *message)
{
	send_frame(w.conn, 'X', w.ident, message, strlen(message));
}

static int compare_ids(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Send one N frame to every daemon: the runs whose journal grew, then "!id" for runs
 * that ended, each group sorted. */
static void flush_notifications(void)
{
	size_t n = 0, grown = 0;
	for (struct run *r = K.runs; r; r = r->next)
		n += r->dirty || r->ended;
	if (!n)
		return;
	char **ids = xrealloc(NULL, n * sizeof *ids);
	for (struct run *r = K.runs; r; r = r->next)
		if (r->dirty && !r->ended)
			ids[grown++] = r->id;
	size_t ended = grown;
	for (struct run *r = K.runs; r; r = r->next)
		if (r->ended)
			ids[ended++] = r->id;
	qsort(ids, grown, sizeof *ids, compare_ids);
	qsort(ids + grown, n - grown, sizeof *ids, compare_ids);
	struct buf text = {0};
	for (size_t i = 0; i < n; i++) {
		if (i)
			buf_byte(&text, '\n');
		if (i >= grown)
			buf_byte(&text, '!');
		buf_str(&text, ids[i]);
	}
	free(ids);
	for (struct run *r = K.runs; r; r = r->next)
		r->dirty = r->ended = false;
	for (struct conn *c = K.conns, *next; c; c = next) {
		next = c->next;
		send_frame(c, 'N', 0, text.data, text.len);
	}
	buf_free(&text);
}

/* ---- ending a run ------------------------------------------------------------------- */

static void signal_group(struct run *r, int sig)
{
	if (!r->exited && r->pid > 0)
		killpg(r->pid, sig);
}

/* Ask the run to end: SIGTERM at once, SIGKILL after the grace. The first reason wins. */
static void request_kill(struct run *r, int reason, const char *message, double grace)
{
	if (!r->kill_reason) {
		r->kill_reason = reason;
		snprintf(r->kill_message, sizeof r->kill_message, "%s", message);
	}
	if (r->exited || r->pid <= 0)
		return;
	double now = monotonic();
	r->term_at = now;
	double deadline = now + (grace > 0 ? grace : 0); /* NaN and negatives: no grace */
	r->kill_at = r->kill_at != 0 && r->kill_at < deadline ? r->kill_at : deadline;
}

static double default_grace(const struct run *r)
{
	return r->grace != 0 ? r->grace : DEFAULT_GRACE;
}

/* What a journal write's result means for the run: any failure stops the run with the
 * reason, never the keeper and its other runs. Unless it was one record too large, the
 * journal cannot take more: the run's later output is read and dropped (on_output), so
 * the pipes drain instead of waking the loop until the run is gone. */
static void journal_result(struct run *r, int rc, bool announce)
{
	if (rc == -TOO_BIG && !r->journal_failed) {
		request_kill(r, REASON_ERROR, MSG_TOO_BIG, 0);
	} else if (rc) {
		char message[128];
		if (rc == -ENOSPC || rc == -EDQUOT)
			snprintf(message, sizeof message, "%s", MSG_DISK_FULL);
		else if (rc == -TOO_BIG) /* after a failure already: the first reason stays */
			snprintf(message, sizeof message, "%s", MSG_TOO_BIG);
		else
			snprintf(message, sizeof message, "cannot write the journal (%s): the run was stopped",
				 strerror(-rc));
		r->journal_failed = true;
		request_kill(r, REASON_ERROR, message, 0);
	}
	if (announce) {
		r->announce_at = 0;
		r->dirty = true;
	}
}

static const char *signal_name(int sig, char *out, size_t cap)
{
	static const char *const names[] = {
	    NULL, "SIGHUP", "SIGINT", "SIGQUIT", "SIGILL", "SIGTRAP", "SIGABRT", "SIGBUS",
	    "SIGFPE", "SIGKILL", "SIGUSR1", "SIGSEGV", "SIGUSR2", "SIGPIPE", "SIGALRM",
	    "SIGTERM", "SIGSTKFLT", "SIGCHLD", "SIGCONT", "SIGSTOP", "SIGTSTP", "SIGTTIN",
	    "SIGTTOU", "SIGURG", "SIGXCPU", "SIGXFSZ", "SIGVTALRM", "SIGPROF", "SIGWINCH",
	    "SIGIO", "SIGPWR", "SIGSYS",
	};
	if (sig > 0 && sig < 32)
		snprintf(out, cap, "%s", names[sig]);
	else if (sig == SIGRTMIN)
		snprintf(out, cap, "SIGRTMIN");
	else if (sig == SIGRTMAX)
		snprintf(out, cap, "SIGRTMAX");
	else if (sig > SIGRTMIN && sig < SIGRTMAX)
		snprintf(out, cap, "SIGRTMIN+%d", sig - SIGRTMIN);
	else
		snprintf(out, cap, "signal %d", sig);
	return out;
}

/* The oom_kill counter of a cgroup's memory.events (v2) or memory.oom_control (v1). */
static uint64_t oom_kills(void)
{
	char text[8192];
	if (!K.memory_events || !*K.memory_events)
		return 0;
	int fd = open(K.memory_events, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, text, sizeof text - 1);
	close(fd);
	if (n <= 0)
		return 0;
	text[n] = 0;
	for (char *line = text, *end; line && *line; line = end ? end + 1 : NULL) {
		end = strchr(line, '\n');
		if (end)
			*end = 0;
		if (strncmp(line, "oom_kill ", 9))
			continue;
		char *value = line + 9;
		while (*value == ' ' || *value == '\t' || *value == '\r')
			value++;
		size_t digits = strspn(value, "0123456789");
		if (digits && !value[digits + strspn(value + digits, " \t\r")])
			return strtoull(value, NULL, 10);
	}
	return 0;
}

/* Why a run that failed while the sandbox's OOM counter rose ended. Not only SIGKILL of
 * the run itself: the killer may pick a child of it, and the run then fails its own way. */
static void oom_message(int code, int sig, char *out, size_t cap)
{
	char name[32];
	if (sig == SIGKILL)
		snprintf(out, cap, "killed by the out-of-memory killer");
	else if (sig)
		snprintf(out, cap, "killed by %s after the out-of-memory killer struck in the sandbox while it ran",
			 signal_name(sig, name, sizeof name));
	else
		snprintf(out, cap, "exited with status %d after the out-of-memory killer struck in the sandbox while it ran",
			 code);
}

static int exit_reason(struct run *r, int code, int sig, char *message, size_t cap)
{
	char name[32];
	if (r->kill_reason) { /* we ended it (timeout, cancel, output limit), however it went */
		snprintf(message, cap, "%s", r->kill_message);
		return r->kill_reason;
	}
	if ((sig || code) && oom_kills() > r->oom_before) {
		oom_message(code, sig, message, cap);
		return REASON_OOM;
	}
	if (sig) {
		snprintf(message, cap, "killed by signal %s", signal_name(sig, name, sizeof name));
		return REASON_SIGNALLED;
	}
	*message = 0;
	return REASON_EXITED;
}

static void unlink_run(struct run *r)
{
	*(r->prev ? &r->prev->next : &K.runs) = r->next;
	*(r->next ? &r->next->prev : &K.runs_tail) = r->prev;
}

static void free_run(struct run *r)
{
	buf_free(&r->stdin_queue);
	buf_free(&r->step);
	free(r->waiters);
	free(r->id);
	free(r);
}

/* Write the Exited event, tell the daemons, then fsync and forget the run. */
static void write_exit(struct run *r, int code, int sig, int reason, const char *message,
		       const struct rusage *ru)
{
	struct buf exited = {0}, rusage = {0}, body = {0};
	pb_int32_field(&exited, 1, code);
	pb_int32_field(&exited, 2, sig);
	pb_varint_field(&exited, 3, (uint64_t)reason);
	pb_bytes_field(&exited, 4, message, strlen(message), false);
	pb_double_field(&exited, 5, monotonic() - r->started);
	if (ru) {
		pb_double_field(&rusage, 1, (double)ru->ru_utime.tv_sec + ru->ru_utime.tv_usec * 0.000001);
		pb_double_field(&rusage, 2, (double)ru->ru_stime.tv_sec + ru->ru_stime.tv_usec * 0.000001);
		pb_varint_field(&rusage, 3, (uint64_t)ru->ru_maxrss * 1024);
		pb_bytes_field(&exited, 6, rusage.data, rusage.len, true);
	}
	pb_bytes_field(&body, 6, exited.data, exited.len, true);
	jw_write_exit(&r->journal, &body);
	buf_free(&exited);
	buf_free(&rusage);
	buf_free(&body);
	r->ended = true;
	flush_notifications();
	jw_close(&r->journal); /* fsyncs, after the daemon has been told */
	unlink_run(r);
	free_run(r);
	if (!K.runs)
		malloc_trim(0); /* idle again: give back what the runs' buffers left free */
}

static void finish(struct run *r)
{
	int code, sig;
	char message[256];
	if (WIFSIGNALED(r->status)) {
		code = -1;
		sig = WTERMSIG(r->status);
	} else {
		code = WEXITSTATUS(r->status);
		sig = 0;
	}
	int reason = exit_reason(r, code, sig, message, sizeof message);
	write_exit(r, code, sig, reason, message, &r->rusage);
}

/* ---- stdin ---------------------------------------------------------------------------- */

static void reply_waiters(struct run *r, const char *error)
{
	size_t n = r->nwaiters;
	struct waiter *waiters = r->waiters;
	r->waiters = NULL;
	r->nwaiters = r->waiters_cap = 0;
	for (size_t i = 0; i < n; i++)
		error ? reply_error(waiters[i], error) : reply_ok(waiters[i], "");
	free(waiters);
}

static void fail_stdin(struct run *r, const char *message);

/* Stop waiting for room in stdin; a terminal's duplicate (want_writable) is closed. */
static void unwatch_stdin(struct run *r)
{
	int watched = r->stdin_w.fd;
	if (watched < 0)
		return;
	watch_remove(&r->stdin_w);
	if (watched != r->stdin_fd)
		close(watched);
}

static void want_writable(struct run *r, int fd, bool want)
{
	if (fd < 0 || !want)
		return unwatch_stdin(r);
	if (r->stdin_w.fd >= 0)
		return;
	/* A terminal's master is watched for output already, and epoll takes an fd only once:
	 * a duplicate of it is watched for room, so a paste larger than the terminal holds
	 * goes on as the run reads. */
	int watched = fd == r->pty_master ? fcntl(fd, F_DUPFD_CLOEXEC, 3) : fd;
	if (watched < 0)
		return fail_stdin(r, "the run's terminal cannot be watched for input");
	watch_add(&r->stdin_w, watched, W_STDIN, EPOLLOUT);
}

static void fail_stdin(struct run *r, const char *message)
{
	unwatch_stdin(r);
	if (r->stdin_fd >= 0) {
		close(r->stdin_fd);
		r->stdin_fd = -1;
	}
	buf_free(&r->stdin_queue);
	r->stdin_off = 0;
	reply_waiters(r, message);
}

/* Write what stdin's queue holds; at its end, close stdin (^D on a terminal) if asked,
 * and tell the waiting writers. */
static void flush_stdin(struct run *r)
{
	int fd = r->pty ? r->pty_master : r->stdin_fd;
	while (r->stdin_queue.len > r->stdin_off && fd >= 0) {
		ssize_t n = write(fd, r->stdin_queue.data + r->stdin_off, r->stdin_queue.len - r->stdin_off);
		if (n < 0 && errno == EAGAIN)
			return want_writable(r, fd, true);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return fail_stdin(r, "the run's stdin is closed");
		r->stdin_off += (size_t)n;
	}
	if (r->stdin_off == r->stdin_queue.len) {
		buf_free(&r->stdin_queue);
		r->stdin_off = 0;
	}
	if (r->stdin_eof && r->pty && r->pty_master >= 0) {
		/* ^D, after the data, through the queue: a full terminal takes it when it has room */
		r->stdin_eof = false;
		buf_byte(&r->stdin_queue, 0x04);
		return flush_stdin(r);
	}
	want_writable(r, fd, false);
	if (r->stdin_eof) {
		r->stdin_eof = false;
		if (r->stdin_fd >= 0) {
			close(r->stdin_fd);
			r->stdin_fd = -1;
		}
	}
	reply_waiters(r, NULL);
}

static void add_waiter(struct run *r, struct waiter w)
{
	if (r->nwaiters == r->waiters_cap) {
		r->waiters_cap = r->waiters_cap ? 2 * r->waiters_cap : 4;
		r->waiters = xrealloc(r->waiters, r->waiters_cap * sizeof *r->waiters);
	}
	r->waiters[r->nwaiters++] = w;
}

static const char *stdin_error(const struct run *r)
{
	if (r->pty)
		return r->pty_master >= 0 ? NULL : "the run's terminal is closed";
	if (!r->stdin_pipe)
		return "the run was started without stdin: start it with stdin=pipe";
	return r->stdin_fd >= 0 ? NULL : "the run's stdin is closed";
}

/* ---- output ------------------------------------------------------------------------- */

/* The most output one journal record takes: READ_BYTES, or a segment where segments are
 * smaller (a record never spans two, and whole segments are what the cap drops). */
static size_t record_bytes(const struct run *r)
{
	return r->journal.segment_bytes < READ_BYTES ? (size_t)r->journal.segment_bytes : READ_BYTES;
}

static void close_output(struct output *o)
{
	struct run *r = o->run;
	int fd = o->w.fd;
	K.may_reap = true; /* output ends when the process does: reap it now, if it is */
	watch_remove(&o->w);
	close(fd);
	for (struct output **p = &r->outputs; *p; p = &(*p)->next) {
		if (*p == o) {
			*p = o->next;
			break;
		}
	}
	bury(&o->w);
	if (fd == r->pty_master) {
		r->pty_master = -1;
		fail_stdin(r, "the run's terminal is closed");
	}
}

static void append_step_event(struct run *r, const uint8_t *frame, size_t n)
{
	uint8_t tag[6] = {0x3A};
	struct iovec body[2] = {{tag, 1 + varint_put(tag + 1, n)}, {(void *)frame, n}};
	journal_result(r, jw_append_event(&r->journal, body, 2, 0), true);
}

/* Frames "u32 length | StepEvent" from fd 3: each complete, valid one is recorded. A frame
 * too large for a record stops the run, and the rest of fd 3 is discarded. */
static void record_step_events(struct run *r, const uint8_t *data, size_t n)
{
	if (r->step_discard)
		return;
	buf_add(&r->step, data, n);
	size_t pos = 0;
	while (r->step.len - pos >= 4) {
		uint32_t len = le32(r->step.data + pos);
		if (len > MAX_STEP_FRAME) {
			journal_result(r, -TOO_BIG, true);
			r->step_discard = true;
			return buf_free(&r->step);
		}
		if (r->step.len - pos - 4 < len) {
			buf_reserve(&r->step, pos + 4 + len - r->step.len);
			break;
		}
		const uint8_t *frame = r->step.data + pos + 4;
		if (step_event_valid(frame, len))
			append_step_event(r, frame, len);
		pos += 4 + (size_t)len;
	}
	buf_consume(&r->step, pos);
	if (!r->step.len)
		buf_free(&r->step);
}

static int pipe_bytes(int fd)
{
	int held = 0;
	if (ioctl(fd, FIONREAD, &held) < 0)
		die("FIONREAD: %s", strerror(errno));
	return held;
}

/* Splice what the pipe holds into the journal. False leaves it to the read path: at end
 * of file (nothing to splice), where the output limit cuts, and for the rest of the run
 * once the journal's file system turns out unable to splice. */
static bool splice_output(struct run *r, struct output *o)
{
	size_t size = (size_t)pipe_bytes(o->w.fd);
	if (size > record_bytes(r))
		size = record_bytes(r);
	if (!size || (r->max_output && r->output_bytes + size > r->max_output))
		return false;
	int rc = jw_splice_output(&r->journal, o->stream, o->w.fd, size);
	if (rc == -EINVAL || rc == -ENOSYS) {
		r->splice = false;
		return false;
	}
	journal_result(r, rc, true);
	r->output_bytes += size;
	return true;
}

static void record_output(struct run *r, struct output *o, const uint8_t *data, size_t n)
{
	if (r->max_output && r->output_bytes + n > r->max_output) {
		char message[64];
		n = r->output_bytes < r->max_output ? (size_t)(r->max_output - r->output_bytes) : 0;
		snprintf(message, sizeof message, "output exceeded %llu bytes", (unsigned long long)r->max_output);
		request_kill(r, REASON_LIMIT, message, default_grace(r));
	}
	r->output_bytes += n;
	if (n)
		journal_result(r, jw_append_output(&r->journal, o->stream, data, n), true);
}

static void on_output(struct output *o)
{
	struct run *r = o->run;
	bool pipe = o->stream == STREAM_STDOUT || o->stream == STREAM_STDERR;
	if (r->splice && pipe && !r->journal_failed && splice_output(r, o))
		return;
	size_t cap = record_bytes(r);
	uint8_t *data = xrealloc(NULL, cap); /* held only while reading */
	ssize_t n = read(o->w.fd, data, cap);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return free(data);
	if (n < 0) { /* EIO: the terminal's other side is closed; anything else ends it too */
		if (errno != EIO)
			dprintf(2, "forgehand-keeper: cannot read the output of run %s: %s\n", r->id,
				strerror(errno));
		n = 0;
	}
	if (n == 0)
		close_output(o);
	else if (r->journal_failed)
		; /* dropped: see journal_result */
	else if (o->stream == STEP_EVENTS)
		record_step_events(r, data, (size_t)n);
	else
		record_output(r, o, data, (size_t)n);
	free(data);
}

static void watch_output(struct run *r, int fd, int stream)
{
	struct output *o = xrealloc(NULL, sizeof *o);
	memset(o, 0, sizeof *o);
	set_nonblocking(fd);
	o->run = r;
	o->stream = stream;
	struct output **tail = &r->outputs;
	while (*tail)
		tail = &(*tail)->next;
	*tail = o;
	watch_add(&o->w, fd, W_OUTPUT, EPOLLIN);
}

/* ---- spawning ----------------------------------------------------------------------- */

/* How the child gets its fds: sources for fds 0-3 (-1: none; DEV_NULL: open /dev/null),
 * or a terminal to open as 0, 1 and 2 (it becomes the controlling one after setsid). */
#define DEV_NULL (-2)
struct spawn_plan {
	const char *exe, *cwd, *tty;
	char **argv, **envp;
	int fds[4];
};

static void reset_signals(void)
{
	sigset_t none;
	for (int sig = 1; sig < NSIG; sig++)
		signal(sig, SIG_DFL); /* fails harmlessly for SIGKILL, SIGSTOP and libc's own */
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
}

static int child_fds(struct spawn_plan *p)
{
	if (p->tty) {
		int fd = open(p->tty, O_RDWR);
		if (fd < 0)
			return errno;
		for (int t = 0; t < 3; t++)
			if (fd != t && dup2(fd, t) < 0)
				return errno;
		if (fd > 2)
			close(fd);
		return 0;
	}
	for (int t = 0; t < 4; t++) {
		if (p->fds[t] == DEV_NULL && (p->fds[t] = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0)
			return errno;
		/* Above the targets first, so no dup2 below clobbers a source still to come. */
		if (p->fds[t] >= 0 && p->fds[t] < 4 && (p->fds[t] = fcntl(p->fds[t], F_DUPFD_CLOEXEC, 4)) < 0)
			return errno;
	}
	for (int t = 0; t < 4; t++)
		if (p->fds[t] >= 0 && dup2(p->fds[t], t) < 0)
			return errno;
	return 0;
}

static void child_exec(struct spawn_plan *p, int report) __attribute__((noreturn));
static void child_exec(struct spawn_plan *p, int report)
{
	int err;
	setsid();
	reset_signals();
	if (!(err = child_fds(p))) {
		if (p->cwd && *p->cwd && chdir(p->cwd) < 0)
			err = errno;
		else {
			execve(p->exe, p->argv, p->envp);
			err = errno;
		}
	}
	if (write(report, &err, sizeof err) < 0) {
		/* the parent sees EOF and a dead child */
	}
	_exit(127);
}

/* fork + execve; the pid, or -errno of what failed (the child reports it through a
 * CLOEXEC pipe that exec closes). */
static pid_t spawn(struct spawn_plan *p)
{
	int report[2], err = 0;
	if (pipe2(report, O_CLOEXEC) < 0)
		return -errno;
	pid_t pid = fork();
	if (pid == 0) {
		close(report[0]);
		child_exec(p, report[1]);
	}
	int saved = errno;
	close(report[1]);
	if (pid < 0) {
		close(report[0]);
		return -saved;
	}
	ssize_t n;
	do
		n = read(report[0], &err, sizeof err);
	while (n < 0 && errno == EINTR);
	close(report[0]);
	if (n == (ssize_t)sizeof err) {
		waitpid(pid, NULL, 0);
		return -err;
	}
	return pid;
}

static void set_winsize(int fd, unsigned rows, unsigned cols, int *err)
{
	struct winsize size = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
	if (ioctl(fd, TIOCSWINSZ, &size) < 0 && err)
		*err = errno;
}

static void close_fds(const int *fds, int n)
{
	for (int i = 0; i < n; i++)
		if (fds[i] >= 0)
			close(fds[i]);
}

static pid_t spawn_pipes(struct run *r, const struct keeper_start *ks, struct spawn_plan *p)
{
	int out[2] = {-1, -1}, err[2] = {-1, -1}, in[2] = {-1, -1}, ev[2] = {-1, -1};
	bool stdin_pipe = ks->stdin_pipe || ks->stdin_data.n || ks->stdin_close;
	pid_t pid = -EMFILE;
	if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0
	    || (stdin_pipe && pipe2(in, O_CLOEXEC) < 0) || (ks->step_events && pipe2(ev, O_CLOEXEC) < 0)) {
		pid = -errno;
		int all[8] = {out[0], out[1], err[0], err[1], in[0], in[1], ev[0], ev[1]};
		close_fds(all, 8);
		return pid;
	}
	fcntl(out[0], F_SETPIPE_SZ, PIPE_BYTES); /* failure is harmless: a smaller pipe */
	fcntl(err[0], F_SETPIPE_SZ, PIPE_BYTES);
	p->fds[0] = stdin_pipe ? in[0] : DEV_NULL;
	p->fds[1] = out[1];
	p->fds[2] = err[1];
	p->fds[3] = ev[1];
	pid = spawn(p);
	int child_ends[4] = {in[0], out[1], err[1], ev[1]};
	close_fds(child_ends, 4);
	if (pid < 0) {
		int ours[4] = {out[0], err[0], in[1], ev[0]};
		close_fds(ours, 4);
		return pid;
	}
	r->stdin_fd = in[1];
	if (in[1] >= 0)
		set_nonblocking(in[1]);
	watch_output(r, out[0], STREAM_STDOUT);
	watch_output(r, err[0], STREAM_STDERR);
	if (ev[0] >= 0)
		watch_output(r, ev[0], STEP_EVENTS);
	return pid;
}

static pid_t spawn_pty(struct run *r, const struct keeper_start *ks, struct spawn_plan *p)
{
	char tty[64];
	int err = 0;
	/* O_NOCTTY: the keeper leads its own session and must not take the terminal. */
	int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (master < 0)
		return -errno;
	if (grantpt(master) < 0 || unlockpt(master) < 0 || (err = ptsname_r(master, tty, sizeof tty))) {
		err = err ? err : errno;
		close(master);
		return -err;
	}
	int slave = open(tty, O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (slave < 0) {
		err = errno;
		close(master);
		return -err;
	}
	set_winsize(slave, ks->pty_rows ? ks->pty_rows : 24, ks->pty_cols ? ks->pty_cols : 80, &err);
	p->tty = tty;
	pid_t pid = err ? -err : spawn(p);
	close(slave);
	if (pid < 0) {
		close(master);
		return pid;
	}
	r->pty_master = master;
	watch_output(r, master, STREAM_PTY);
	return pid;
}

/* shutil.which(cmd, path=path): an existing, executable non-directory; malloc'd or NULL.
 * Unlike shutil.which, empty PATH entries are skipped (not taken as the keeper's cwd). */
static char *which(const char *cmd, const char *path)
{
	for (const char *dir = path, *end; dir; dir = *end ? end + 1 : NULL) {
		end = strchrnul(dir, ':');
		size_t n = (size_t)(end - dir);
		if (!n)
			continue;
		struct buf candidate = {0};
		buf_add(&candidate, dir, n);
		if (dir[n - 1] != '/')
			buf_byte(&candidate, '/');
		buf_str(&candidate, cmd);
		struct stat st;
		const char *name = buf_cstr(&candidate);
		if (!stat(name, &st) && !access(name, X_OK) && !S_ISDIR(st.st_mode))
			return (char *)candidate.data;
		buf_free(&candidate);
	}
	return NULL;
}

static char **cstrings(const struct slices *s)
{
	char **out = xrealloc(NULL, (s->n + 1) * sizeof *out);
	for (size_t i = 0; i < s->n; i++)
		out[i] = xstrndup(s->items[i].p, s->items[i].n);
	out[s->n] = NULL;
	return out;
}

static void free_cstrings(char **v)
{
	for (char **p = v; p && *p; p++)
		free(*p);
	free(v);
}

static const char *env_path(char **envp)
{
	const char *path = NULL;
	for (char **e = envp; *e; e++)
		if (!strncmp(*e, "PATH=", 5))
			path = *e + 5;
	return path ? path : DEFAULT_PATH;
}

/* Start the run's process; false, and why into *failure, if it could not start. */
static bool spawn_run(struct run *r, const struct keeper_start *ks, struct buf *failure)
{
	struct spawn_plan plan = {.argv = cstrings(&ks->argv), .envp = cstrings(&ks->env)};
	char *cwd = xstrndup(ks->cwd.p, ks->cwd.n);
	char *found = NULL;
	const char *argv0 = plan.argv[0];
	plan.cwd = cwd;
	plan.exe = strchr(argv0, '/') ? argv0 : (found = which(argv0, env_path(plan.envp)));
	pid_t pid = 0;
	if (!plan.exe) {
		buf_str(failure, "command not found: ");
		buf_repr(failure, ks->argv.items[0].p, ks->argv.items[0].n);
		buf_str(failure, " (looked in PATH=");
		buf_str(failure, env_path(plan.envp));
		buf_str(failure, ")");
	} else if ((pid = r->pty ? spawn_pty(r, ks, &plan) : spawn_pipes(r, ks, &plan)) < 0) {
		buf_str(failure, "cannot start ");
		buf_repr(failure, ks->argv.items[0].p, ks->argv.items[0].n);
		buf_str(failure, ": ");
		buf_str(failure, strerror((int)-pid));
	}
	free(found);
	free(cwd);
	free_cstrings(plan.argv);
	free_cstrings(plan.envp);
	r->pid = pid > 0 ? pid : 0;
	return pid > 0;
}

static void spawn_failed(struct run *r, const char *message)
{
	struct buf output = {0}, body = {0}, data = {0};
	buf_str(&data, "forgehand-runner: ");
	buf_str(&data, message);
	buf_byte(&data, '\n');
	pb_varint_field(&output, 1, STREAM_STDERR);
	pb_bytes_field(&output, 2, data.data, data.len, false);
	pb_bytes_field(&body, 4, output.data, output.len, true);
	struct iovec iov = {body.data, body.len};
	journal_result(r, jw_append_event(&r->journal, &iov, 1, data.len), true);
	buf_free(&output);
	buf_free(&body);
	buf_free(&data);
	write_exit(r, 127, 0, REASON_ERROR, message, NULL);
}

/* ---- requests ----------------------------------------------------------------------- */

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st, (void)flag, (void)ftw;
	remove(path);
	return 0; /* as shutil.rmtree(ignore_errors=True): go on */
}

static void cannot_create(struct buf *error, const char *path, int err)
{
	buf_str(error, "keeper failed: cannot create ");
	buf_str(error, path);
	buf_str(error, ": ");
	buf_str(error, strerror(err));
}

/* A fresh directory for a run, holding its request (request.pb, written before the run is
 * spawned, so a daemon that dies meanwhile finds the run on its restart). A leftover of a
 * run closed while no daemon was up goes first. False, and why into *error, if it fails. */
static bool make_run_dir(const char *dir, struct slice request, struct buf *error)
{
	struct stat st;
	if (!lstat(dir, &st))
		nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
	if (mkdir(dir, 0700) < 0) {
		cannot_create(error, dir, errno);
		return false;
	}
	char *tmp = path_of(dir, "request.tmp"), *final = path_of(dir, "request.pb");
	int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	int err = fd < 0 ? errno : 0;
	if (fd >= 0) {
		ssize_t n = request.n ? write(fd, request.p, request.n) : 0;
		err = n < 0 ? errno : (size_t)n != request.n ? ENOSPC : 0;
		close(fd);
	}
	if (!err && rename(tmp, final) < 0)
		err = errno;
	if (err)
		cannot_create(error, tmp, err);
	free(tmp);
	free(final);
	return !err;
}

static struct run *new_run(const struct keeper_start *ks)
{
	struct run *r = xrealloc(NULL, sizeof *r);
	memset(r, 0, sizeof *r);
	r->id = xstrndup(ks->run_id.p, ks->run_id.n);
	r->stdin_fd = r->pty_master = -1;
	r->stdin_w.fd = -1;
	r->splice = true;
	r->pty = ks->pty;
	r->stdin_pipe = ks->stdin_pipe;
	r->timeout = ks->timeout;
	r->grace = ks->grace;
	r->max_output = ks->max_output;
	return r;
}

static void append_run(struct run *r)
{
	r->prev = K.runs_tail;
	*(K.runs_tail ? &K.runs_tail->next : &K.runs) = r;
	K.runs_tail = r;
}

/* Directory and journal of a new run; NULL and a message in *error if they fail. */
static struct run *prepare_run(const struct keeper_start *ks, struct buf *error)
{
	struct buf dir = {0};
	struct run *r = NULL;
	buf_str(&dir, K.state_dir);
	buf_str(&dir, "/runs/");
	buf_add(&dir, ks->run_id.p, ks->run_id.n);
	if (make_run_dir(buf_cstr(&dir), ks->request, error)) {
		char *journal = path_of(buf_cstr(&dir), "journal");
		uint64_t max = ks->journal_max && ks->journal_max < K.journal_max ? ks->journal_max : K.journal_max;
		r = new_run(ks);
		int rc = jw_open(&r->journal, journal, max);
		if (rc) {
			cannot_create(error, journal, -rc);
			jw_close(&r->journal);
			free_run(r);
			r = NULL;
		}
		free(journal);
	}
	buf_free(&dir);
	return r;
}

static void append_started(struct run *r)
{
	struct buf started = {0}, body = {0};
	pb_varint_field(&started, 1, (uint64_t)r->pid);
	pb_varint_field(&started, 2, time_ns());
	pb_bytes_field(&body, 3, started.data, started.len, true);
	struct iovec iov = {body.data, body.len};
	journal_result(r, jw_append_event(&r->journal, &iov, 1, 0), false);
	buf_free(&started);
	buf_free(&body);
}

/* Whether the request must be refused; the X reply's text into *error. */
static bool start_refused(const struct keeper_start *ks, const char *malformed, struct buf *error)
{
	struct buf what = {0};
	if (malformed) {
		buf_str(&what, "malformed KeeperStart: ");
		buf_str(&what, malformed);
	} else {
		start_validate(ks, &what);
	}
	if (!what.len && find_run(ks->run_id.p, ks->run_id.n)) {
		buf_str(&what, "run ");
		buf_repr(&what, ks->run_id.p, ks->run_id.n);
		buf_str(&what, " is still live: choose another run_id");
	}
	if (what.len) {
		buf_str(error, "keeper failed: ");
		buf_add(error, what.data, what.len);
	}
	buf_free(&what);
	return error->len > 0;
}

static void spawned(struct run *r, const struct keeper_start *ks, struct waiter w)
{
	char pid[16];
	append_started(r);
	/* A short command's Started, output and exit then reach the client in one batch. */
	r->announce_at = monotonic() + ANNOUNCE_DELAY;
	if (ks->stdin_data.n || ks->stdin_close) {
		buf_add(&r->stdin_queue, ks->stdin_data.p, ks->stdin_data.n);
		r->stdin_eof = ks->stdin_close;
		flush_stdin(r);
	}
	snprintf(pid, sizeof pid, "%d", (int)r->pid);
	reply_ok(w, pid);
}

/* S: validate, make the run's directory and journal, spawn; reply the pid ("0" when the
 * command could not start: the journal says why). */
static void start_request(struct waiter w, const uint8_t *payload, size_t n)
{
	struct keeper_start ks;
	struct buf error = {0}, failure = {0};
	const char *malformed = start_decode(&ks, payload, n);
	struct run *r = start_refused(&ks, malformed, &error) ? NULL : prepare_run(&ks, &error);
	if (!r) {
		reply_error(w, buf_cstr(&error));
	} else {
		r->started = monotonic();
		r->oom_before = oom_kills();
		append_run(r);
		if (spawn_run(r, &ks, &failure)) {
			spawned(r, &ks, w);
		} else {
			spawn_failed(r, buf_cstr(&failure));
			reply_ok(w, "0");
		}
	}
	start_free(&ks);
	buf_free(&error);
	buf_free(&failure);
}

/* The run a control request names, or NULL after an X reply. */
static struct run *run_for(struct waiter w, struct slice id)
{
	struct run *r = find_run(id.p, id.n);
	if (r && !r->exited)
		return r;
	struct buf message = {0};
	if (!utf8_valid(id.p, id.n)) {
		buf_str(&message, "keeper failed: the run id is not UTF-8");
	} else {
		buf_str(&message, "run ");
		buf_repr(&message, id.p, id.n);
		buf_str(&message, " has already ended");
	}
	reply_error(w, buf_cstr(&message));
	buf_free(&message);
	return NULL;
}

/* Split "run_id NUL rest". */
static struct slice split_id(const uint8_t *payload, size_t n, struct slice *rest)
{
	const uint8_t *nul = n ? memchr(payload, 0, n) : NULL;
	size_t id_len = nul ? (size_t)(nul - payload) : n;
	*rest = nul ? (struct slice){nul + 1, n - id_len - 1} : (struct slice){payload + n, 0};
	return (struct slice){payload, id_len};
}

static void stdin_request(struct waiter w, const uint8_t *payload, size_t n)
{
	struct slice rest, id = split_id(payload, n, &rest);
	struct run *r = run_for(w, id);
	if (!r)
		return;
	const char *error = stdin_error(r);
	if (error)
		return reply_error(w, error);
	if (rest.n > 1)
		buf_add(&r->stdin_queue, rest.p + 1, rest.n - 1);
	r->stdin_eof = r->stdin_eof || (rest.n && rest.p[0] == 1);
	add_waiter(r, w);
	flush_stdin(r);
}

static void resize_request(struct waiter w, const uint8_t *payload, size_t n)
{
	struct slice size, id = split_id(payload, n, &size);
	struct run *r = run_for(w, id);
	int err = 0;
	if (!r)
		return;
	if (r->pty_master < 0 || size.n != 4)
		return reply_error(w, "the run has no terminal: start it with pty=true");
	set_winsize(r->pty_master, (unsigned)(size.p[0] | size.p[1] << 8), (unsigned)(size.p[2] | size.p[3] << 8), &err);
	if (err) {
		char text[128];
		snprintf(text, sizeof text, "keeper failed: cannot resize the terminal: %s", strerror(err));
		return reply_error(w, text);
	}
	killpg(r->pid, SIGWINCH);
	reply_ok(w, "");
}

static void cancel_request(struct waiter w, const uint8_t *payload, size_t n)
{
	struct slice grace_bytes, id = split_id(payload, n, &grace_bytes);
	struct run *r = find_run(id.p, id.n);
	if (!r || r->exited)
		return reply_ok(w, "0");
	double grace = DEFAULT_GRACE;
	if (grace_bytes.n == 8)
		grace = pb_double_value(grace_bytes.p);
	request_kill(r, REASON_CANCELLED, "cancelled", grace);
	reply_ok(w, "1");
}

static void live_request(struct waiter w)
{
	struct buf ids = {0};
	for (struct run *r = K.runs; r; r = r->next) {
		if (r != K.runs)
			buf_byte(&ids, '\n');
		buf_str(&ids, r->id);
	}
	send_frame(w.conn, 'O', w.ident, ids.data, ids.len);
	buf_free(&ids);
}

static void dispatch(struct conn *c, uint8_t kind, uint32_t ident, const uint8_t *payload, size_t n)
{
	struct waiter w = {c, ident};
	switch (kind) {
	case 'S': return start_request(w, payload, n);
	case 'I': return stdin_request(w, payload, n);
	case 'R': return resize_request(w, payload, n);
	case 'C': return cancel_request(w, payload, n);
	case 'L': return live_request(w);
	}
	struct buf message = {0};
	uint8_t utf8[2] = {(uint8_t)(0xC0 | kind >> 6), (uint8_t)(0x80 | (kind & 0x3F))};
	buf_str(&message, "unknown request ");
	buf_repr(&message, kind < 0x80 ? &kind : utf8, kind < 0x80 ? 1 : 2); /* chr(kind) */
	reply_error(w, buf_cstr(&message));
	buf_free(&message);
}

/* Dispatch the whole frames the buffer holds. False if one announces more than
 * MAX_FRAME_BYTES: the connection is dropped (after the frames before it). */
static bool dispatch_frames(struct conn *c)
{
	size_t pos = 0;
	bool ok = true;
	while (c->in.len - pos >= FRAME_HEADER) {
		const uint8_t *frame = c->in.data + pos;
		uint32_t len = le32(frame + 5);
		if (len > MAX_FRAME_BYTES) {
			ok = false;
			break;
		}
		if (c->in.len - pos - FRAME_HEADER < len)
			break;
		dispatch(c, frame[0], le32(frame + 1), frame + FRAME_HEADER, len);
		pos += FRAME_HEADER + len;
	}
	buf_consume(&c->in, pos);
	return ok;
}

static void on_conn_readable(struct conn *c)
{
	size_t want = CONN_READ_BYTES;
	if (c->in.len >= FRAME_HEADER) { /* read the rest of a large frame at once */
		uint64_t frame = FRAME_HEADER + (uint64_t)le32(c->in.data + 5);
		if (frame - FRAME_HEADER > MAX_FRAME_BYTES)
			return drop_conn(c);
		if (frame > c->in.len && frame - c->in.len > want)
			want = (size_t)(frame - c->in.len);
	}
	buf_reserve(&c->in, want);
	ssize_t n = recv(c->w.fd, c->in.data + c->in.len, want, 0);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0)
		return drop_conn(c);
	c->in.len += (size_t)n;
	bool ok = dispatch_frames(c);
	if (!c->in.len)
		buf_free(&c->in); /* an idle connection holds no buffer */
	if (!ok)
		drop_conn(c);
}

static void on_conn(struct conn *c, uint32_t events)
{
	if (events & (EPOLLOUT | EPOLLERR) && c->out.len > c->out_off)
		conn_send(c, NULL, 0, NULL, 0);
	if (!c->dead && events & (EPOLLIN | EPOLLHUP | EPOLLERR))
		on_conn_readable(c);
}

static void on_accept(void)
{
	int fd = accept4(K.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0)
		return;
	struct conn *c = xrealloc(NULL, sizeof *c);
	memset(c, 0, sizeof *c);
	c->next = K.conns;
	K.conns = c;
	watch_add(&c->w, fd, W_CONN, EPOLLIN);
}

/* ---- the supervisor (supervise mode) ------------------------------------------------ */

static void supervisor_stop(int code, const char *why)
{
	if (!K.stopping) {
		S.exit_code = code;
		snprintf(S.reason, sizeof S.reason, "%s", why);
	}
	K.stopping = true;
}

static void close_fds_except(int keep)
{
	int low = keep > 2 ? keep : 2;
	if (low > 3)
		close_range(3, (unsigned)low - 1, 0);
	close_range((unsigned)low + 1, ~0u, 0);
}

/* The forked child: shed the keeper's state, die with it, run the daemon. */
static void be_daemon(int ready_fd) __attribute__((noreturn));
static void be_daemon(int ready_fd)
{
	reset_signals();
	prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
	if (getppid() != S.self) /* the keeper died before the prctl */
		_exit(GAVE_UP_EXIT);
	close_fds_except(ready_fd);
	if (ready_fd >= 0)
		fcntl(ready_fd, F_SETFD, 0);
	char **argv = ready_fd >= 0 ? S.first_argv : S.argv;
	execv(argv[0], argv);
	say("cannot run the daemon %s: %s", argv[0], strerror(errno));
	_exit(SETTINGS_EXIT);
}

static int start_daemon(int ready_fd)
{
	pid_t pid = fork();
	if (pid < 0)
		return -errno;
	if (pid == 0)
		be_daemon(ready_fd);
	S.daemon_pid = pid;
	return 0;
}

/* The daemon is gone: remove its sockets, then restart it, stop, or give up. */
static void daemon_exited(int status)
{
	char why[64], name[32], text[256];
	S.daemon_pid = 0;
	for (int i = 0; i < S.nsockets; i++)
		unlink(S.sockets[i]);
	int code = WIFSIGNALED(status) ? -WTERMSIG(status) : WEXITSTATUS(status);
	if (code == 0 || code == SETTINGS_EXIT) {
		snprintf(text, sizeof text, "the daemon exited with status %d: stopping", code);
		return supervisor_stop(code, text);
	}
	if (code < 0)
		snprintf(why, sizeof why, "killed by %s", signal_name(-code, name, sizeof name));
	else
		snprintf(why, sizeof why, "exited with %d", code);
	double now = monotonic();
	while (S.nrestarts && now - S.restarts[0] > RESTART_WINDOW_SECONDS)
		memmove(S.restarts, S.restarts + 1, --S.nrestarts * sizeof *S.restarts);
	if (S.nrestarts >= S.max_restarts) {
		snprintf(text, sizeof text, "the daemon was %s after %d restarts", why, S.nrestarts);
		return supervisor_stop(GAVE_UP_EXIT, text);
	}
	S.restarts = xrealloc(S.restarts, (size_t)(S.nrestarts + 1) * sizeof *S.restarts);
	S.restarts[S.nrestarts++] = now;
	say("the daemon was %s: restarting it", why);
	int rc = start_daemon(-1);
	if (rc < 0) {
		snprintf(text, sizeof text, "cannot fork a new daemon ([Errno %d] %s): giving up", -rc, strerror(-rc));
		supervisor_stop(GAVE_UP_EXIT, text);
	}
}

static void end_child(pid_t pid, double grace)
{
	kill(pid, SIGTERM);
	double deadline = monotonic() + grace;
	struct timespec pause = {0, 10 * 1000 * 1000};
	for (;;) {
		pid_t got = waitpid(pid, NULL, WNOHANG);
		if (got != 0)
			return; /* ended, or not our child (any more) */
		if (monotonic() > deadline) {
			kill(pid, SIGKILL);
			waitpid(pid, NULL, 0);
			return;
		}
		nanosleep(&pause, NULL);
	}
}

static void supervisor_shutdown(void)
{
	say("%s", S.reason);
	for (struct run *r = K.runs; r; r = r->next)
		signal_group(r, SIGKILL);
	if (S.daemon_pid) {
		end_child(S.daemon_pid, STOP_GRACE_SECONDS);
		S.daemon_pid = 0;
	}
}

/* ---- the loop ----------------------------------------------------------------------- */

static void reap(void)
{
	int status;
	struct rusage ru;
	K.may_reap = false;
	for (;;) {
		pid_t pid = wait4(-1, &status, WNOHANG, &ru);
		if (pid <= 0)
			return;
		struct run *r = K.runs;
		while (r && (r->exited || r->pid != pid))
			r = r->next;
		if (r) {
			r->exited = true;
			r->status = status;
			r->rusage = ru;
			killpg(pid, SIGKILL); /* the run is over: whatever is left of its group goes too */
			r->drain_until = monotonic() + DRAIN_SECONDS;
			fail_stdin(r, "the run has ended");
		} else if (K.supervising && pid == S.daemon_pid) {
			daemon_exited(status);
		}
	}
}

static void enforce_deadlines(void)
{
	double now = monotonic();
	for (struct run *r = K.runs; r; r = r->next) {
		if (r->timeout > 0 && !r->kill_reason && now - r->started >= r->timeout) {
			char message[64];
			snprintf(message, sizeof message, "timed out after %gs", r->timeout);
			request_kill(r, REASON_TIMEOUT, message, default_grace(r));
		}
		if (r->term_at != 0 && now >= r->term_at) {
			r->term_at = 0;
			signal_group(r, SIGTERM);
			signal_group(r, SIGCONT);
		}
		if (r->kill_at != 0 && now >= r->kill_at) {
			r->kill_at = 0;
			signal_group(r, SIGKILL);
		}
	}
}

static void finish_drained(void)
{
	double now = monotonic();
	for (struct run *r = K.runs, *next; r; r = next) {
		next = r->next;
		if (!r->exited || (r->outputs && now < r->drain_until))
			continue;
		while (r->outputs)
			close_output(r->outputs);
		finish(r);
	}
}

static void announce_due(void)
{
	double now = monotonic();
	for (struct run *r = K.runs; r; r = r->next) {
		if (r->announce_at != 0 && now >= r->announce_at) {
			r->announce_at = 0;
			r->dirty = true;
		}
	}
}

static bool should_exit(void)
{
	if (K.stopping)
		return true;
	if (K.conns || K.runs || (K.supervising && S.daemon_pid)) {
		K.idle_since = monotonic();
		return false;
	}
	return monotonic() - K.idle_since > IDLE_EXIT_SECONDS;
}

/* Milliseconds to the next deadline, rounded up (as Python's selectors do). */
static int next_timeout_ms(void)
{
	double now = monotonic(), next = now + IDLE_EXIT_SECONDS;
	for (struct run *r = K.runs; r; r = r->next) {
		double deadlines[5] = {r->term_at, r->kill_at, r->drain_until, r->announce_at, 0};
		if (r->timeout > 0 && !r->kill_reason)
			deadlines[4] = r->started + r->timeout;
		for (int i = 0; i < 5; i++)
			if (deadlines[i] != 0 && deadlines[i] < next)
				next = deadlines[i];
	}
	double ms = (next - now) * 1e3;
	return ms <= 0 ? 0 : ms >= 3600e3 ? 3600000 : (int)ms + ((double)(int)ms < ms);
}

static void on_signals(void)
{
	struct signalfd_siginfo info;
	K.may_reap = true; /* SIGCHLD (or another signal: a spare wait4 is harmless) */
	while (read(K.sig_fd, &info, sizeof info) == (ssize_t)sizeof info)
		if (info.ssi_signo == SIGTERM && K.supervising)
			supervisor_stop(0, "stopping on SIGTERM");
}

static void on_event(struct epoll_event *ev)
{
	struct watch *w = ev->data.ptr;
	if (w->fd < 0)
		return; /* unregistered earlier in this batch */
	switch (w->kind) {
	case W_LISTENER: return on_accept();
	case W_SIGNALS: return on_signals();
	case W_CONN: return on_conn((struct conn *)w, ev->events);
	case W_OUTPUT: return on_output((struct output *)w);
	case W_STDIN: return flush_stdin((struct run *)((char *)w - offsetof(struct run, stdin_w)));
	}
}

static void serve_forever(void)
{
	struct epoll_event events[64];
	while (!should_exit()) {
		int n = epoll_wait(K.epfd, events, 64, next_timeout_ms());
		for (int i = 0; i < n; i++)
			on_event(&events[i]);
		if (K.may_reap)
			reap();
		enforce_deadlines();
		finish_drained();
		announce_due();
		flush_notifications();
		free_dead();
	}
}

static void noop_handler(int sig) { (void)sig; }

/* Signals arrive through a signalfd. SIGCHLD (and SIGTERM when supervising) get real
 * handlers although they are blocked: a pid namespace's init (the keeper under podman)
 * never receives a signal whose disposition is SIG_DFL, blocked or not. */
static void install_signals(void)
{
	sigset_t set;
	struct sigaction act = {.sa_handler = noop_handler};
	sigemptyset(&act.sa_mask);
	sigemptyset(&set);
	sigaddset(&set, SIGCHLD);
	sigaction(SIGCHLD, &act, NULL);
	if (K.supervising) {
		sigaddset(&set, SIGTERM);
		sigaction(SIGTERM, &act, NULL);
	}
	sigprocmask(SIG_BLOCK, &set, NULL);
	signal(SIGPIPE, SIG_IGN);
	signal(SIGINT, SIG_IGN);
	signal(SIGHUP, SIG_IGN);
	signal(SIGXFSZ, SIG_IGN); /* a file size limit fails the journal's write (EFBIG) instead */
	K.sig_fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
	if (K.sig_fd < 0)
		die("signalfd: %s", strerror(errno));
}

static void keeper_init(void)
{
	crc_init();
	/* Large buffers (a 1 MiB read) come from mmap and go back on free: the keeper's
	 * footprint is what it holds now, not the most it ever held. */
	mallopt(M_MMAP_THRESHOLD, 128 * 1024);
	mallopt(M_TRIM_THRESHOLD, 128 * 1024);
	K.epfd = epoll_create1(EPOLL_CLOEXEC);
	if (K.epfd < 0)
		die("epoll_create1: %s", strerror(errno));
	install_signals();
	watch_add(&K.listen_w, K.listen_fd, W_LISTENER, EPOLLIN);
	watch_add(&K.sig_w, K.sig_fd, W_SIGNALS, EPOLLIN);
	K.idle_since = monotonic();
}

/* Lock the state dir (for this process's whole life), bind and listen on keeper.sock and
 * become the child subreaper. 0, or 1 if another keeper holds the lock. */
static int keeper_listen(void)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	char *path = path_of(K.state_dir, "keeper.lock");
	int lock = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (lock < 0)
		die("cannot open %s: %s", path, strerror(errno));
	if (flock(lock, LOCK_EX | LOCK_NB) < 0) {
		if (errno != EWOULDBLOCK)
			die("cannot lock %s: %s", path, strerror(errno));
		close(lock);
		free(path);
		return 1;
	}
	free(path);
	int n = snprintf(addr.sun_path, sizeof addr.sun_path, "%s/keeper.sock", K.state_dir);
	if (n < 0 || (size_t)n >= sizeof addr.sun_path)
		die("the socket path %s/keeper.sock is too long", K.state_dir);
	unlink(addr.sun_path);
	K.listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (K.listen_fd < 0)
		die("socket: %s", strerror(errno));
	mode_t old = umask(0177);
	int rc = bind(K.listen_fd, (struct sockaddr *)&addr, sizeof addr);
	umask(old);
	if (rc < 0 || listen(K.listen_fd, 16) < 0)
		die("cannot listen on %s: %s", addr.sun_path, strerror(errno));
	prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
	return 0;
}

/* ---- command line ------------------------------------------------------------------- */

static const char USAGE[] =
    "usage: forgehand-keeper serve --state-dir DIR --journal-max-bytes N [--memory-events PATH]\n"
    "       forgehand-keeper supervise --state-dir DIR --journal-max-bytes N [--memory-events PATH]\n"
    "                        [--max-restarts N] [--ready-fd N] [--socket PATH]... -- DAEMON_ARGV...\n";

static void usage(const char *problem) __attribute__((noreturn));
static void usage(const char *problem)
{
	dprintf(2, "%sforgehand-keeper: error: %s\n", USAGE, problem);
	exit(2);
}

static unsigned long long number(const char *option, const char *text, unsigned long long max)
{
	char *end;
	char message[256];
	errno = 0;
	unsigned long long v = strtoull(text, &end, 10);
	if (!*text || *end || errno || *text == '-' || v > max) {
		snprintf(message, sizeof message, "%s wants a number up to %llu, not '%s'", option, max, text);
		usage(message);
	}
	return v;
}

/* Parse argv; returns the index of the daemon's argv (supervise) or argc. */
static int parse_args(int argc, char **argv, bool supervise)
{
	S.max_restarts = MAX_RESTARTS;
	S.ready_fd = -1;
	int i = 2;
	for (; i < argc; i++) {
		const char *opt = argv[i];
		if (supervise && !strcmp(opt, "--"))
			return i + 1 < argc ? i + 1 : (usage("the daemon's argv is missing after --"), 0);
		bool known = !strcmp(opt, "--state-dir") || !strcmp(opt, "--journal-max-bytes")
			     || !strcmp(opt, "--memory-events")
			     || (supervise && (!strcmp(opt, "--max-restarts") || !strcmp(opt, "--ready-fd")
					       || !strcmp(opt, "--socket")));
		char message[256];
		snprintf(message, sizeof message, known ? "%s wants a value" : "unknown argument '%s'", opt);
		if (!known || i + 1 >= argc)
			usage(message);
		const char *value = argv[++i];
		if (!strcmp(opt, "--state-dir"))
			K.state_dir = value;
		else if (!strcmp(opt, "--journal-max-bytes"))
			K.journal_max = number(opt, value, ULLONG_MAX);
		else if (!strcmp(opt, "--memory-events"))
			K.memory_events = value;
		else if (!strcmp(opt, "--max-restarts"))
			S.max_restarts = (int)number(opt, value, 1000000);
		else if (!strcmp(opt, "--ready-fd"))
			S.ready_fd = (int)number(opt, value, INT_MAX);
		else {
			S.sockets = xrealloc(S.sockets, (size_t)(S.nsockets + 1) * sizeof *S.sockets);
			S.sockets[S.nsockets++] = (char *)value;
		}
	}
	if (supervise)
		usage("the daemon's argv is missing: end the options with -- DAEMON_ARGV...");
	return i;
}

static void check_settings(void)
{
	if (!K.state_dir || !*K.state_dir)
		usage("--state-dir is required");
	if (!K.journal_max)
		usage("--journal-max-bytes is required (a positive number)");
}

/* serve: detach, then be the keeper of the state dir until idle. */
static int serve_main(void)
{
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid > 0)
		_exit(0); /* the daemon reaps this one; the keeper belongs to no daemon */
	setsid();
	prctl(PR_SET_NAME, KEEPER_COMM, 0, 0, 0);
	int busy = keeper_listen();
	if (!busy)
		keeper_init();
	const char *answer = busy ? "busy\n" : "ready\n";
	if (write(1, answer, strlen(answer)) < 0) {
		/* the daemon is gone: serve all the same */
	}
	/* Close the ready pipe, but keep fd 1 taken (by /dev/null), so no pipe of a run ever
	 * lands on a standard fd number. */
	int null = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (null >= 0 && null != 1) {
		dup2(null, 1);
		close(null);
	} else if (null < 0) {
		close(1);
	}
	if (busy)
		return 0;
	serve_forever();
	return 0;
}

/* supervise: be the keeper and the daemon's supervisor; the exit status. */
/* mkdir -p, new directories 0700; 0 or an errno. */
static int make_dirs(const char *path)
{
	char *copy = xstrndup(path, strlen(path));
	int err = 0;
	for (char *p = copy + 1; !err; p++) {
		bool last = !*p;
		if (*p != '/' && !last)
			continue;
		*p = 0;
		if (mkdir(copy, 0700) < 0 && errno != EEXIST)
			err = errno;
		if (last)
			break;
		*p = '/';
	}
	free(copy);
	return err;
}

static int supervise_main(int argc, char **argv, int daemon_index)
{
	int n = argc - daemon_index;
	S.argv = xrealloc(NULL, (size_t)(n + 1) * sizeof *S.argv);
	memcpy(S.argv, argv + daemon_index, (size_t)n * sizeof *S.argv);
	S.argv[n] = NULL;
	static char ready[16];
	snprintf(ready, sizeof ready, "%d", S.ready_fd);
	S.first_argv = xrealloc(NULL, (size_t)(n + 3) * sizeof *S.first_argv);
	memcpy(S.first_argv, S.argv, (size_t)n * sizeof *S.argv);
	S.first_argv[n] = "--ready-fd";
	S.first_argv[n + 1] = ready;
	S.first_argv[n + 2] = NULL;
	S.self = getpid();
	K.supervising = true;
	prctl(PR_SET_NAME, KEEPER_COMM, 0, 0, 0);
	/* A sandbox starts the keeper first: the state dir may not exist yet. */
	int err = make_dirs(K.state_dir);
	if (err) {
		say("cannot create --state-dir %s: %s", K.state_dir, strerror(err));
		return SETTINGS_EXIT;
	}
	if (keeper_listen()) {
		say("another keeper holds %s: stop it or choose another --state-dir", K.state_dir);
		return SETTINGS_EXIT;
	}
	keeper_init();
	int rc = start_daemon(S.ready_fd);
	if (S.ready_fd >= 0)
		close(S.ready_fd); /* the daemon has its copy; EOF must follow its death */
	if (rc < 0) { /* e.g. the sandbox's pids limit */
		say("cannot fork the daemon: [Errno %d] %s", -rc, strerror(-rc));
		return GAVE_UP_EXIT;
	}
	serve_forever();
	supervisor_shutdown();
	return S.exit_code;
}

int main(int argc, char **argv)
{
	bool serve = argc > 1 && !strcmp(argv[1], "serve");
	bool supervise = argc > 1 && !strcmp(argv[1], "supervise");
	if (!serve && !supervise)
		usage("the first argument must be serve or supervise");
	int daemon_index = parse_args(argc, argv, supervise);
	check_settings();
	return serve ? serve_main() : supervise_main(argc, argv, daemon_index);
}
