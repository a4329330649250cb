// Collectives between the processes of one host over a POSIX shared-memory segment (the design of
// DeepSpeed's CPU shm comm and SGLang's shm all-reduce), as ops.Custom aot kernels
// (parallel/shm.py) and a C entry for ctypes tests.
//
// Segment: a header, then per local rank a control block (pid, slot locks, a table of call-site
// entries) and NSLOTS data slots of slot_bytes each. A call site is identified by a 64-bit key
// (group member mask, tag) that every member computes alike; each rank owns one entry per key in
// its own table (inserted by CAS, found by peers by linear probing). One call of an op on a
// message = one or more chunks; per chunk, with s = the entry's next sequence number:
//   1. take a free slot of mine, copy my part of the chunk into it;
//   2. publish info (slot, bytes) then arrive = s (release);
//   3. wait until every member's entry for this key has arrive == s (acquire) and equal bytes;
//   4. compute my output from the members' slots, in member order (ascending rank) for sums, so
//      every rank adds the same operands in the same order: bit-identical results;
//   5. done = s; the slot is free once every member's done >= s, which is checked lazily: before
//      the slot is written again, and before call s + 1 of the call site replaces my info (one
//      synchronisation per op; the readers are usually done long before).
// Steps 1-2 (arrive) and 3-5 (complete) are separate functions: the host loop's float32 sum
// (qshm_arrive / qshm_complete) runs other work between them.
// Keys per call site (not one counter per group) let independent collectives of one graph run
// concurrently (MindSpore's CPU runtime does that) and in any order across ranks without mixing
// their data; a call site executed by one rank only is a timeout naming it, never a silent mix.
// Waits spin (QWEN3MOE_SHM_SPIN pauses, then, opt-in, up to QWEN3MOE_SHM_SPIN_US microseconds while most recent
// waits were that short: learn), then sleep on the peer's futex word; after
// QWEN3MOE_SHM_TIMEOUT seconds (default 300), or when a member's
// process has exited, the op fails with a one-line error naming the op, its call site and the
// rank that did not arrive.
#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <ctime>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>

#if defined(__x86_64__)
#include <immintrin.h>
#define QSHM_PAUSE() _mm_pause()
#else
#define QSHM_PAUSE() ((void)0)
#endif

namespace {

constexpr uint64_t kMagic = 0x71336d6f65736d31ULL;
constexpr int kMaxRanks = 64;
constexpr int kSlots = 4;
constexpr int kTable = 4096;  // call sites per rank (a 48-layer model uses ~1000 keys)

enum Op { kAllReduce = 0, kAllGather = 1, kReduceScatter = 2, kAllToAll = 3 };
const char *kOpName[] = {"all_reduce", "all_gather", "reduce_scatter", "all_to_all"};

struct alignas(64) Entry {
  std::atomic<uint64_t> key;     // 0: empty
  std::atomic<uint64_t> arrive;  // last sequence number published
  std::atomic<uint64_t> done;    // last sequence number this rank finished reading
  std::atomic<uint64_t> info;    // slot << 56 | bytes of this rank's part of the chunk
};

struct alignas(64) RankBlock {
  std::atomic<int64_t> pid;
  alignas(64) std::atomic<uint32_t> epoch;    // futex word: bumped after every arrive / done store
  std::atomic<uint32_t> waiters;              // peers sleeping on `epoch`
  alignas(64) std::atomic<uint32_t> pad;
  std::atomic<uint32_t> busy[kSlots];
  Entry table[kTable];
};

struct alignas(64) Header {
  uint64_t magic;
  int64_t nranks, slot_bytes;
};

struct State {
  char *base = nullptr;
  size_t bytes = 0;
  int nranks = 0, rank = -1;
  int64_t slot_bytes = 0;
  double timeout_s = 300.0;
  uint64_t spin = 200;  // pauses before sleeping at least (QWEN3MOE_SHM_SPIN)
  int64_t spin_cap_ns = 0;  // the adaptive spin's ceiling (QWEN3MOE_SHM_SPIN_US; 0: off, the default: at
                           // load 8-16 a 100 us ceiling tripled a decoding tp2 rank's CPU time a token)
  std::atomic<int32_t> short_waits{1024};  // recent waits within spin_cap_ns, of 1024 (learn)
  // process-local counters (qshm_stats, bench/parallel_decode.py): ops run, futex sleeps, wait time
  std::atomic<uint64_t> ops{0}, sleeps{0}, wait_ns{0};
  std::mutex mu;  // guards `sites` and `error`
  std::map<uint64_t, std::string> sites;
  std::string error;
} g;

RankBlock *block(int r) {
  return reinterpret_cast<RankBlock *>(g.base + sizeof(Header)) + r;
}

char *slot(int r, int i) {
  char *data = g.base + sizeof(Header) + g.nranks * sizeof(RankBlock);
  return data + (int64_t(r) * kSlots + i) * g.slot_bytes;
}

size_t segment_bytes(int n, int64_t slot_bytes) {
  return sizeof(Header) + n * sizeof(RankBlock) + size_t(n) * kSlots * slot_bytes;
}

uint64_t mix(uint64_t k) {  // splitmix64 finaliser: table position of a key
  k ^= k >> 30; k *= 0xbf58476d1ce4e5b9ULL; k ^= k >> 27; k *= 0x94d049bb133111ebULL;
  return k ^ (k >> 31);
}

// This rank's entry for key (inserted), or a peer's (nullptr while the peer has not inserted it).
Entry *find(int r, uint64_t key, bool insert) {
  Entry *t = block(r)->table;
  for (uint64_t i = 0, h = mix(key); i < kTable; ++i) {
    Entry &e = t[(h + i) % kTable];
    uint64_t k = e.key.load(std::memory_order_acquire);
    if (k == key) return &e;
    if (k == 0) {
      if (!insert) return nullptr;
      uint64_t zero = 0;
      if (e.key.compare_exchange_strong(zero, key, std::memory_order_acq_rel)) return &e;
      if (zero == key) return &e;
    }
  }
  return nullptr;  // table full (insert) or key absent
}

std::string site_name(uint64_t key) {
  std::lock_guard<std::mutex> lock(g.mu);
  auto it = g.sites.find(key);
  char buf[64];
  std::snprintf(buf, sizeof buf, "tag %u", unsigned(key & 0xffffffffu));
  return it == g.sites.end() ? std::string(buf) : it->second;
}

int fail(const std::string &msg) {
  std::lock_guard<std::mutex> lock(g.mu);
  g.error = msg;
  return -1;
}

// Whether rank r's process still runs (an exited child stays a zombie until its parent reaps it).
bool alive(int r) {
  int64_t pid = block(r)->pid.load(std::memory_order_relaxed);
  if (pid <= 0) return true;
  if (kill(pid_t(pid), 0) != 0 && errno == ESRCH) return false;
  char path[64], buf[256];
  std::snprintf(path, sizeof path, "/proc/%lld/stat", (long long)pid);
  FILE *f = std::fopen(path, "r");
  if (f == nullptr) return true;
  size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  buf[n] = 0;
  const char *close_paren = std::strrchr(buf, ')');
  return close_paren == nullptr || (close_paren[2] != 'Z' && close_paren[2] != 'X');
}

// A store a peer may be waiting for: bump my futex word and wake its sleepers.
void publish() {
  RankBlock *b = block(g.rank);
  b->epoch.fetch_add(1, std::memory_order_seq_cst);
  if (b->waiters.load(std::memory_order_seq_cst) > 0)
    syscall(SYS_futex, reinterpret_cast<uint32_t *>(&b->epoch), FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
}

// Sleep until rank r publishes (or 20 ms pass), unless pred() already holds.
template <class P>
void sleep_on(int r, P &pred) {
  RankBlock *b = block(r);
  b->waiters.fetch_add(1, std::memory_order_seq_cst);
  const uint32_t e = b->epoch.load(std::memory_order_seq_cst);
  if (!pred()) {
    timespec ts{0, 20 * 1000 * 1000};
    syscall(SYS_futex, reinterpret_cast<uint32_t *>(&b->epoch), FUTEX_WAIT, e, &ts, nullptr, 0);
  }
  b->waiters.fetch_sub(1, std::memory_order_seq_cst);
}

// The adaptive spin: after each wait of w ns, an average (1/8 weight) of whether w was within the
// ceiling; the budget is the ceiling while at least 3/4 of recent waits were (peers arriving
// within tens of microseconds, a quiet machine: spinning beats the futex round trip, tens of
// microseconds in a VM), else none (peers off their cores, a loaded machine: spinning would
// take the core a peer needs).
void learn(int64_t w) {
  const int32_t s = g.short_waits.load(std::memory_order_relaxed);
  g.short_waits.store(s + ((w <= g.spin_cap_ns ? 1024 : 0) - s) / 8, std::memory_order_relaxed);
}

int64_t spin_budget() {
  return g.spin_cap_ns > 0 && g.short_waits.load(std::memory_order_relaxed) >= 768 ? g.spin_cap_ns : 0;
}

// Wait until pred() holds: spin (QWEN3MOE_SHM_SPIN pauses, then on up to spin_budget()),
// then sleep on the futex of rank `who`; on timeout or a dead peer fail with a one-line message.
template <class P>
int wait_for(P pred, int op, uint64_t key, int who, const char *what) {
  using clock = std::chrono::steady_clock;
  if (pred()) return 0;
  const auto t0 = clock::now();
  auto since = [&t0] { return int64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now() - t0).count()); };
  struct Waited {  // the wait's time, on every return: counted, and learnt by the spin budget
    decltype(since) &ns;
    ~Waited() {
      const int64_t w = ns();
      g.wait_ns.fetch_add(uint64_t(w), std::memory_order_relaxed);
      if (g.spin_cap_ns > 0) learn(w);
    }
  } waited{since};
  const int64_t budget = spin_budget();
  bool spinning = true;
  for (uint64_t k = 0;; ++k) {
    if (pred()) return 0;
    if (spinning) {
      if (k < g.spin || (budget > 0 && ((k & 31) != 0 || since() < budget))) {
        QSHM_PAUSE();
        continue;
      }
      spinning = false;
    }
    g.sleeps.fetch_add(1, std::memory_order_relaxed);
    sleep_on(who, pred);
    if (k % 16) continue;
    double s = std::chrono::duration<double>(clock::now() - t0).count();
    bool dead = !alive(who);
    if (pred()) return 0;  // the peer may have finished its part, then exited
    if (s > g.timeout_s || dead) {
      char buf[512];
      std::snprintf(buf, sizeof buf, "shared-memory %s at call site '%s' (rank %d): rank %d did not %s", kOpName[op],
                    site_name(key).c_str(), g.rank, who, what);
      std::string msg(buf);
      msg += dead ? " (its process exited)" : " within " + std::to_string(int(g.timeout_s)) + " s (QWEN3MOE_SHM_TIMEOUT)";
      return fail(msg);
    }
  }
}

int take_slot() {
  RankBlock *b = block(g.rank);
  for (uint64_t k = 0;; ++k) {
    for (int i = 0; i < kSlots; ++i) {
      uint32_t zero = 0;
      if (b->busy[i].compare_exchange_strong(zero, 1, std::memory_order_acquire)) return i;
    }
    if (k > 4096) std::this_thread::yield();
  }
}

struct Members {
  int n = 0, pos = -1, rank[kMaxRanks];
};

// Wait until every member has finished reading call s of `key` (its done >= s).
int wait_read(int op, uint64_t key, uint64_t s, int n, const int *rank, Entry *const *pe) {
  for (int j = 0; j < n; ++j) {
    Entry *p = pe[j];
    if (p == nullptr) continue;
    int rc = wait_for([&] { return p->done.load(std::memory_order_acquire) >= s; }, op, key, rank[j],
                      "finish reading");
    if (rc != 0) return rc;
  }
  return 0;
}

// A slot's last call, whose readers must be done before the slot is written again. Touched only
// by the thread holding the slot (busy), so process-local.
struct Pending {
  int op = 0, n = 0, rank[kMaxRanks];
  uint64_t key = 0, s = 0;
  Entry *pe[kMaxRanks];
} pending[kSlots];

// One chunk of one op between its two halves: arrive (my part published) and complete.
struct Call {
  int op = 0, slot = -1;
  uint64_t key = 0, s = 0;
  int64_t bytes = 0;
  Members m;
  Entry *e = nullptr, *pe[kMaxRanks];
};

// First half of a chunk: `mine` (bytes) copied into a slot of mine and published. One
// synchronisation per op: the readers of my slot are waited for lazily, when the slot or this
// call site is used again (usually long done by then).
int arrive(Call &c, const char *mine) {
  c.e = find(g.rank, c.key, true);
  if (c.e == nullptr) return fail("shared-memory collectives: more than 4096 call sites on one rank");
  c.s = c.e->arrive.load(std::memory_order_relaxed) + 1;
  for (int j = 0; j < c.m.n; ++j) c.pe[j] = find(c.m.rank[j], c.key, false);
  // my entry's info of call s - 1 is replaced below: every member must have read it
  if (c.s > 1 && wait_read(c.op, c.key, c.s - 1, c.m.n, c.m.rank, c.pe) != 0) return -1;
  const int i = c.slot = take_slot();
  Pending &prev = pending[i];
  if (prev.s != 0 && wait_read(prev.op, prev.key, prev.s, prev.n, prev.rank, prev.pe) != 0) {
    block(g.rank)->busy[i].store(0, std::memory_order_release);
    return -1;
  }
  prev.s = 0;
  std::memcpy(slot(g.rank, i), mine, size_t(c.bytes));
  c.e->info.store((uint64_t(i) << 56) | uint64_t(c.bytes), std::memory_order_relaxed);
  c.e->arrive.store(c.s, std::memory_order_release);
  publish();
  return 0;
}

// Second half: wait for every member's part, fill(peer_slots) computes the output, done.
template <class F>
int complete(Call &c, F fill) {
  const int i = c.slot;
  const char *peer[kMaxRanks];
  for (int j = 0; j < c.m.n; ++j) {
    const int r = c.m.rank[j];
    auto arrived = [&] {
      if (c.pe[j] == nullptr) c.pe[j] = find(r, c.key, false);
      return c.pe[j] != nullptr && c.pe[j]->arrive.load(std::memory_order_acquire) >= c.s;
    };
    if (wait_for(arrived, c.op, c.key, r, "arrive") != 0) {
      block(g.rank)->busy[i].store(0, std::memory_order_release);
      return -1;
    }
    uint64_t info = c.pe[j]->info.load(std::memory_order_relaxed);
    if (c.pe[j]->arrive.load(std::memory_order_acquire) != c.s || int64_t(info & ((1ULL << 56) - 1)) != c.bytes) {
      char buf[512];
      std::snprintf(buf, sizeof buf, "shared-memory %s at call site '%s' (rank %d): rank %d sent %lld bytes in "
                    "call %llu, this rank %lld bytes in call %llu (the ranks run different programs)",
                    kOpName[c.op], site_name(c.key).c_str(), g.rank, r,
                    (long long)(info & ((1ULL << 56) - 1)), (unsigned long long)c.pe[j]->arrive.load(),
                    (long long)c.bytes, (unsigned long long)c.s);
      block(g.rank)->busy[i].store(0, std::memory_order_release);
      return fail(buf);
    }
    peer[j] = slot(r, int(info >> 56));
  }
  fill(peer);
  c.e->done.store(c.s, std::memory_order_release);
  publish();
  Pending &prev = pending[i];
  prev.op = c.op;
  prev.n = c.m.n;
  prev.key = c.key;
  prev.s = c.s;
  for (int j = 0; j < c.m.n; ++j) {
    prev.rank[j] = c.m.rank[j];
    prev.pe[j] = c.pe[j];
  }
  block(g.rank)->busy[i].store(0, std::memory_order_release);
  return 0;
}

// One chunk of one op: `mine` is copied into my slot (bytes); fill(peer_slots) computes the output.
template <class F>
int exchange(int op, uint64_t key, const Members &m, const char *mine, int64_t bytes, F fill) {
  Call c;
  c.op = op;
  c.key = key;
  c.m = m;
  c.bytes = bytes;
  if (arrive(c, mine) != 0) return -1;
  return complete(c, fill);
}

void add_into(float *out, const float *a, int64_t n, bool first) {
  if (first) {
    std::memcpy(out, a, size_t(n) * sizeof(float));
  } else {
    for (int64_t k = 0; k < n; ++k) out[k] += a[k];
  }
}

int elem_size(const char *dtype) {
  std::string d(dtype);
  if (d == "float64" || d == "int64" || d == "uint64") return 8;
  if (d == "float32" || d == "int32" || d == "uint32") return 4;
  if (d == "float16" || d == "bfloat16" || d == "int16") return 2;
  return 1;
}

// The members of group `mask`, this rank's position among them.
int members(uint64_t mask, Members &m) {
  if (g.base == nullptr) return fail("shared-memory collectives: the segment is not set up (parallel/shm.setup)");
  for (int r = 0; r < kMaxRanks; ++r)
    if (mask >> r & 1) {
      if (r >= g.nranks) return fail("shared-memory collectives: group has rank " + std::to_string(r) +
                                     " outside the segment's " + std::to_string(g.nranks) + " ranks");
      if (r == g.rank) m.pos = m.n;
      m.rank[m.n++] = r;
    }
  if (m.pos < 0) return fail("shared-memory collectives: this rank is not in the group");
  return 0;
}

uint64_t call_key(uint64_t mask, uint32_t tag) { return (mask << 32 >> 32 == mask ? mask : mix(mask)) << 32 | tag; }

// op on `count` elements of my input (all_gather: my block; reduce_scatter / all_to_all: n blocks
// of count / n); out as the op defines (kernels/… parallel/shm.py shapes).
int run(int op, uint64_t mask, uint32_t tag, const char *in, char *out, int64_t count, int esize, bool is_f32) {
  Members m;
  if (members(mask, m) != 0) return -1;
  if ((op == kAllReduce || op == kReduceScatter) && !is_f32)
    return fail(std::string("shared-memory ") + kOpName[op] + ": float32 only");
  const uint64_t key = call_key(mask, tag);
  const int n = m.n;
  g.ops.fetch_add(1, std::memory_order_relaxed);
  const int64_t slot_elems = g.slot_bytes / esize;
  if (op == kAllReduce || op == kAllGather) {
    const int64_t chunk = slot_elems;
    for (int64_t a = 0; a < count || (a == 0 && count == 0); a += chunk) {
      const int64_t c = std::min(chunk, count - a);
      int rc = exchange(op, key, m, in + a * esize, c * esize, [&](const char **peer) {
        if (op == kAllReduce) {
          for (int j = 0; j < n; ++j)
            add_into(reinterpret_cast<float *>(out) + a, reinterpret_cast<const float *>(peer[j]), c, j == 0);
        } else {
          for (int j = 0; j < n; ++j) std::memcpy(out + (j * count + a) * esize, peer[j], size_t(c) * esize);
        }
      });
      if (rc != 0 || count == 0) return rc;
    }
    return 0;
  }
  if (count % n) return fail(std::string("shared-memory ") + kOpName[op] + ": " + std::to_string(count) +
                             " elements do not split into " + std::to_string(n) + " equal blocks");
  const int64_t blk = count / n, chunk = std::max<int64_t>(slot_elems / n, 1);
  char *stage = static_cast<char *>(std::malloc(size_t(std::min(chunk, std::max<int64_t>(blk, 1)) * n * esize)));
  int rc = 0;
  for (int64_t a = 0; a < blk && rc == 0; a += chunk) {
    const int64_t c = std::min(chunk, blk - a);
    for (int j = 0; j < n; ++j) std::memcpy(stage + j * c * esize, in + (j * blk + a) * esize, size_t(c) * esize);
    rc = exchange(op, key, m, stage, n * c * esize, [&](const char **peer) {
      for (int j = 0; j < n; ++j) {
        const char *part = peer[j] + m.pos * c * esize;  // member j's block for me
        if (op == kReduceScatter) {
          add_into(reinterpret_cast<float *>(out) + a, reinterpret_cast<const float *>(part), c, j == 0);
        } else {
          std::memcpy(out + (j * blk + a) * esize, part, size_t(c) * esize);
        }
      }
    });
  }
  std::free(stage);
  return rc;
}

// Host calls between qshm_arrive and qshm_complete (handles 0..7).
Call g_open[8];
bool g_used[8];
std::mutex g_open_mu;

int kernel(int op, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  int64_t count = 1;
  for (int i = 0; i < ndims[0]; ++i) count *= shapes[0][i];
  const int64_t *meta = static_cast<const int64_t *>(params[1]);  // [mask, tag]
  int rc = run(op, uint64_t(meta[0]), uint32_t(meta[1]), static_cast<const char *>(params[0]),
               static_cast<char *>(params[nparam - 1]), count, elem_size(dtypes[0]),
               std::strcmp(dtypes[0], "float32") == 0);
  if (rc != 0) {
    // MindSpore turns a failed kernel into a long C++ trace: the cause goes first, on one line
    std::fprintf(stderr, "qwen3moe shm: error: %s\n", g.error.c_str());
    std::fflush(stderr);
    if (std::getenv("QWEN3MOE_SHM_RAISE") == nullptr) std::_Exit(75);
  }
  return rc;
}

}  // namespace

extern "C" {

// Rank 0 creates (O_EXCL) and initialises the segment; the others attach after a barrier.
int qshm_open(const char *name, int nranks, int rank, long long slot_bytes, int create, double timeout_s) {
  if (nranks < 1 || nranks > kMaxRanks || rank < 0 || rank >= nranks) return fail("bad rank / world size");
  const size_t bytes = segment_bytes(nranks, slot_bytes);
  int fd = shm_open(name, create ? (O_CREAT | O_EXCL | O_RDWR) : O_RDWR, 0600);
  if (fd < 0) return fail(std::string("shm_open ") + name + ": " + std::strerror(errno));
  // reserve the pages now: a /dev/shm too small for the segment is an error here, not a SIGBUS
  // at the first large message
  int err = create ? posix_fallocate(fd, 0, off_t(bytes)) : 0;
  if (err != 0) {
    close(fd);
    shm_unlink(name);
    return fail(std::string("cannot reserve ") + std::to_string(bytes >> 20) + " MiB for " + name + " in /dev/shm (" +
                std::strerror(err) + "); lower QWEN3MOE_SHM_SLOT_MIB or use QWEN3MOE_COLLECTIVES=mccl");
  }
  void *p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return fail(std::string("mmap ") + name + ": " + std::strerror(errno));
  Header *h = static_cast<Header *>(p);
  if (create) {
    h->nranks = nranks;
    h->slot_bytes = slot_bytes;  // the rest is zero (ftruncate)
    std::atomic_thread_fence(std::memory_order_release);
    h->magic = kMagic;
  } else if (h->magic != kMagic || h->nranks != nranks || h->slot_bytes != slot_bytes) {
    munmap(p, bytes);
    return fail(std::string("segment ") + name + " does not belong to this job");
  }
  for (Pending &pend : pending) pend.s = 0;  // records of an earlier segment
  if (const char *spin = std::getenv("QWEN3MOE_SHM_SPIN")) g.spin = std::strtoull(spin, nullptr, 10);
  if (const char *us = std::getenv("QWEN3MOE_SHM_SPIN_US")) g.spin_cap_ns = 1000 * std::strtoll(us, nullptr, 10);
  g.short_waits.store(1024);
  g.base = static_cast<char *>(p);
  g.bytes = bytes;
  g.nranks = nranks;
  g.rank = rank;
  g.slot_bytes = slot_bytes;
  g.timeout_s = timeout_s;
  block(rank)->pid.store(getpid(), std::memory_order_release);
  return 0;
}

int qshm_unlink(const char *name) { return shm_unlink(name); }

void qshm_set_timeout(double s) { g.timeout_s = s; }

void qshm_describe(unsigned long long mask, unsigned tag, const char *site) {
  const uint64_t key = call_key(mask, tag);
  std::lock_guard<std::mutex> lock(g.mu);
  g.sites[key] = site;
}

const char *qshm_error() { return g.error.c_str(); }

// Counters since the process started: ops run, futex sleeps while waiting, nanoseconds waited.
void qshm_stats(unsigned long long *out) {
  out[0] = g.ops.load();
  out[1] = g.sleeps.load();
  out[2] = g.wait_ns.load();
}

// ctypes entry for tests: same as the kernels, returns 0 or -1 (message: qshm_error()).
int qshm_run(int op, unsigned long long mask, unsigned tag, const void *in, void *out, long long count,
             int esize, int is_f32) {
  return run(op, mask, tag, static_cast<const char *>(in), static_cast<char *>(out), count, esize, is_f32 != 0);
}

// A float32 all-reduce of `count` elements (one slot at most) in two calls, for the host loop:
// qshm_arrive publishes this rank's part and returns at once (a handle), qshm_complete waits for
// the members' parts and writes the sum. Work between the two (a step graph whose collectives
// synchronise the ranks anyway) hides the wait. One call of a call site in flight at a time.
int qshm_arrive(unsigned long long mask, unsigned tag, const float *in, long long count) {
  Call c;
  if (members(mask, c.m) != 0) return -1;
  if (count * int64_t(sizeof(float)) > g.slot_bytes) return fail("shared-memory arrive: more than one slot");
  c.op = kAllReduce;
  c.key = call_key(mask, tag);
  c.bytes = count * int64_t(sizeof(float));
  int h = -1;
  {
    std::lock_guard<std::mutex> lock(g_open_mu);
    for (int k = 0; k < 8 && h < 0; ++k)
      if (!g_used[k]) g_used[k] = true, h = k;
  }
  if (h < 0) return fail("shared-memory arrive: more than 8 host calls in flight");
  g.ops.fetch_add(1, std::memory_order_relaxed);
  if (arrive(c, reinterpret_cast<const char *>(in)) != 0) {
    std::lock_guard<std::mutex> lock(g_open_mu);
    g_used[h] = false;
    return -1;
  }
  g_open[h] = c;
  return h;
}

int qshm_complete(int h, float *out) {
  if (h < 0 || h >= 8 || !g_used[h]) return fail("shared-memory complete: no such call in flight");
  Call &c = g_open[h];
  const int64_t count = c.bytes / int64_t(sizeof(float));
  int rc = complete(c, [&](const char **peer) {
    for (int j = 0; j < c.m.n; ++j) add_into(out, reinterpret_cast<const float *>(peer[j]), count, j == 0);
  });
  std::lock_guard<std::mutex> lock(g_open_mu);
  g_used[h] = false;
  return rc;
}

int ShmAllReduce(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return kernel(kAllReduce, nparam, params, ndims, shapes, dtypes);
}
int ShmAllGather(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return kernel(kAllGather, nparam, params, ndims, shapes, dtypes);
}
int ShmReduceScatter(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                     void *) {
  return kernel(kReduceScatter, nparam, params, ndims, shapes, dtypes);
}
int ShmAllToAll(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return kernel(kAllToAll, nparam, params, ndims, shapes, dtypes);
}

}  // extern "C"
