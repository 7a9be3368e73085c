// cuda_emu.h: runs CUDA kernel sources on the CPU, compiled by g++ (-std=c++20 -pthread), for tests.
//
// Include this header BEFORE a .cu file: it defines GK_CUDA_EMU and provides what the kernels of
// csrc/cuda use from the CUDA language and runtime.
//
// Execution model
// - A launch GK_LAUNCH(kernel, grid, block, smem, stream, args...) runs to completion before it returns
//   (launches are serialised by a global mutex; the stream is ignored). It creates blockDim threads as
//   std::threads; they execute the blocks of the grid one after another (x fastest, then y, z), all
//   threads together, with a block-wide barrier before and after each block.
// - __syncthreads() is a block barrier (mutex + condition variable). Every thread of the block must
//   reach the SAME __syncthreads() call site (file:line) or the end of the block together; a thread that
//   returned early while others wait at a __syncthreads(), or two threads at different call sites, is
//   reported as a divergent barrier; a barrier not completed within GK_EMU_TIMEOUT_S seconds (default 60)
//   is reported as a deadlock. A reported error releases every barrier, the launch finishes, and
//   cudaGetLastError() returns cudaErrorLaunchFailure; gk_emu::last_error_message() says why.
// - Warp shuffles (__shfl_xor_sync, __shfl_down_sync, __shfl_sync) and __syncwarp(): each warp (32
//   consecutive linear thread ids, the last one possibly shorter) has an exchange buffer and a barrier:
//   a lane writes its value, waits for the whole warp, reads its source lane, waits again. The mask must
//   name every lane of the warp (partial masks are reported as an error), width must be 32.
// - __shared__ memory: kernels declare it with GK_SHARED(name, T, N) (an array of N T). Each launch has a
//   48 KiB arena; every thread carves its shared arrays out of it in declaration order, so all threads of
//   a block get the same addresses. The arena is filled with 0xFF bytes (NaN for floats) before every
//   block, so a value read before a thread of THIS block wrote it is garbage, as on a GPU. A plain
//   `__shared__` in a kernel does not compile under the emulator (on purpose).
// - Dynamic shared memory (`extern __shared__`): kernels declare it with GK_DYN_SHARED(name, T), a pointer to
//   the launch's dynamic bytes (after the 48 KiB static arena, also 0xFF-filled). More than 48 KiB needs
//   cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) first, at most
//   227 KiB (static + dynamic) per block, as on sm_90.
// - Thread-block clusters (cudaLaunchKernelEx with cudaLaunchAttributeClusterDimension, at most 8 blocks,
//   the grid a multiple of the cluster): the blocks of ONE cluster run concurrently (cluster size x blockDim
//   std::threads), clusters one after another. cooperative_groups::this_cluster() gives block_rank(),
//   num_blocks(), dim_blocks(), sync(), barrier_arrive() / barrier_wait() (a split barrier over every
//   thread of the cluster, checked like __syncthreads: same call site, deadlock timeout) and
//   map_shared_rank(p, r): p (a pointer into this block's shared memory) moved to block r's shared memory,
//   at the same offset. When a block of a cluster ends, its shared memory is refilled with 0xFF before the
//   cluster ends: a block that reads a peer's shared memory after the peer exited (a missing cluster
//   barrier before exit) reads garbage here and races with that write under ThreadSanitizer.
// - The device: cudaGetDevice() is 0, cudaDeviceGetAttribute gives compute capability 9.0 (set another with
//   gk_emu::set_device_cc(major, minor), e.g. 8.0 to exercise an sm_80 dispatch), 132 SMs, 227 KiB of
//   opt-in shared memory per block; gk_emu::last_launch() is the configuration of the last launch.
// - threadIdx / blockIdx / blockDim / gridDim are thread_local; dim3, uint3, float2/4, uint2/4 and the
//   bit-cast and math intrinsics the kernels use are defined here; device math maps to <math.h>.
//
// What it cannot emulate (do not read a passing emulator test as evidence of these):
// - the CUDA memory model beyond barriers: global / shared memory accesses are plain C++ accesses, so
//   races that a barrier does not order are only found by the ThreadSanitizer build, and only when the
//   schedule exercises them; weak ordering between blocks, fences, atomics' scopes are not modelled
//   (blocks outside one cluster never run concurrently here, so races between them are invisible);
// - independent thread scheduling and warp divergence semantics: lanes are free-running threads that
//   meet only at shuffles / barriers; a shuffle inside a divergent branch deadlocks (reported) instead of
//   executing with a partial warp; lock-step assumptions without __syncwarp() are not checked;
// - timing, occupancy, register pressure, spills, bank conflicts, coalescing, caches;
// - alignment faults: a misaligned 16-byte vector access works on the CPU (x86 tolerates it) where the
//   GPU faults; the kernels' alignment logic is checked by the test asserting which path runs, not here;
// - the GPU's arithmetic: expf / exp2f / logf come from glibc (correctly rounded or <= 1 ulp) where the
//   GPU uses ex2.approx (<= 2 ulp); fp16 conversions use the header's software path, not cvt.rn;
// - out-of-bounds accesses fault only if they leave mapped memory (use ASan/TSan builds to see more);
// - launch limits beyond blockDim <= 1024, the cluster size, and the shared-memory sizes above; whether a
//   cluster of that size and shared memory can be resident on the GPU (cudaOccupancyMaxActiveClusters);
// - TMA, mbarriers, asynchronous copies, the distributed-shared-memory memory model beyond the cluster
//   barrier (a release / acquire pair here, the default of barrier.cluster.arrive / wait).
#pragma once

#define GK_CUDA_EMU 1

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <source_location>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// ---- language keywords -----------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ GK_EMU_declare_shared_memory_with_GK_SHARED_not___shared__

// ---- vector and index types ------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
// Cache-hinted stores are plain stores on the CPU.
template <class T>
inline void __stwb(T* p, const T& v) { *p = v; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ---- runtime API subset ----------------------------------------------------------------------------
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9,
                   cudaErrorLaunchFailure = 719 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrComputeCapabilityMajor = 75,
                      cudaDevAttrComputeCapabilityMinor = 76, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
struct cudaLaunchAttributeValue {
  struct {
    unsigned x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};

namespace gk_emu {

inline std::mutex& error_mutex() {
  static std::mutex m;
  return m;
}
inline std::string& error_message() {
  static std::string s;
  return s;
}
inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}
// The message of the last failed launch (empty when none failed).
inline std::string last_error_message() {
  std::lock_guard<std::mutex> lk(error_mutex());
  return error_message();
}

}  // namespace gk_emu

inline cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> lk(gk_emu::error_mutex());
  const cudaError_t e = gk_emu::last_error();
  gk_emu::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() {
  std::lock_guard<std::mutex> lk(gk_emu::error_mutex());
  return gk_emu::last_error();
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulator)";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulator: see gk_emu::last_error_message)";
    default: break;
  }
  return "unknown error";
}

// ---- intrinsics ------------------------------------------------------------------------------------
inline float __uint_as_float(unsigned u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  memcpy(&u, &f, 4);
  return u;
}
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }

// ---- per-thread coordinates ------------------------------------------------------------------------
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace gk_emu {

constexpr size_t kSharedBytes = 48 * 1024;          // static shared memory (GK_SHARED) per block
constexpr size_t kMaxSharedPerBlock = 227 * 1024;   // static + dynamic, sm_90 opt-in limit
constexpr unsigned kMaxCluster = 8;                 // portable cluster size
struct Launch;

// A reusable barrier that checks that every participant arrived from the same call site. wait() is
// arrive() + wait_phase(); a split barrier (cluster barrier_arrive / barrier_wait) uses the two halves.
class Barrier {
 public:
  Barrier(int n, Launch* l) : n_(n), launch_(l) {}
  // false when the launch is broken (an error was reported): the caller just goes on.
  bool wait(const char* file, int line, const char* what) {
    uint64_t g;
    return arrive(file, line, what, &g) && wait_phase(g, file, line, what);
  }
  bool arrive(const char* file, int line, const char* what, uint64_t* phase);
  bool wait_phase(uint64_t phase, const char* file, int line, const char* what);
  // Wakes every waiter (they re-check whether the launch is broken).
  void release() {
    std::lock_guard<std::mutex> lk(mu_);
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  const int n_;
  Launch* const launch_;
  int count_ = 0;
  uint64_t gen_ = 0;
  const char* file_ = nullptr;
  int line_ = 0;
};

struct Warp {
  Warp(int lanes, Launch* l) : lanes(lanes), bar(lanes, l) {}
  const int lanes;
  Barrier bar;
  uint64_t slot[32];  // lane i's outgoing value during a shuffle
};

// One block of the running cluster: its barrier, warps and shared memory (static arena + dynamic bytes).
struct Cta {
  Cta(int nthreads, size_t dyn, Launch* l) : block_bar(nthreads, l), arena(kSharedBytes + dyn + 64) {
    for (int w = 0; w * 32 < nthreads; ++w)
      warps.emplace_back(new Warp(nthreads - w * 32 < 32 ? nthreads - w * 32 : 32, l));
  }
  unsigned char* base() {  // 64-byte aligned start of the arena
    return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(arena.data()) + 63) & ~uintptr_t(63));
  }
  size_t bytes() const { return arena.size() - 64; }
  Barrier block_bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> arena;
};

struct Launch {
  Launch(int nthreads, dim3 cluster, size_t dyn)
      : nthreads(nthreads), cluster(cluster), ncta(int(cluster.x * cluster.y * cluster.z)), dyn(dyn),
        cluster_bar(nthreads * ncta, this) {
    for (int c = 0; c < ncta; ++c) ctas.emplace_back(new Cta(nthreads, dyn, this));
  }
  // The first error wins; every barrier is released so that all threads run to the end of the launch.
  void fail(const std::string& msg) {
    {
      std::lock_guard<std::mutex> lk(mu);
      if (!broken) message = msg;
      broken = true;
    }
    cluster_bar.release();
    for (auto& c : ctas) {
      c->block_bar.release();
      for (auto& w : c->warps) w->bar.release();
    }
  }
  bool is_broken() {
    std::lock_guard<std::mutex> lk(mu);
    return broken;
  }

  const int nthreads;  // per block
  const dim3 cluster;
  const int ncta;      // blocks per cluster
  const size_t dyn;    // dynamic shared memory bytes per block
  Barrier cluster_bar;
  std::vector<std::unique_ptr<Cta>> ctas;
  std::mutex mu;
  bool broken = false;
  std::string message;
};

struct ThreadState {
  Launch* launch = nullptr;
  Cta* cta = nullptr;
  int rank = 0;              // block rank in the cluster
  int linear = 0;            // linear thread id in the block
  size_t shared_offset = 0;  // next free arena byte for this thread's GK_SHARED declarations
};
inline thread_local ThreadState tstate;

inline double timeout_s() {
  const char* e = getenv("GK_EMU_TIMEOUT_S");
  return e ? atof(e) : 60.0;
}

inline bool Barrier::arrive(const char* file, int line, const char* what, uint64_t* phase) {
  std::unique_lock<std::mutex> lk(mu_);
  *phase = gen_;
  if (launch_->is_broken()) return false;
  if (count_ == 0) {
    file_ = file;
    line_ = line;
  } else if (line != line_ || strcmp(file, file_) != 0) {
    const std::string msg = std::string("divergent ") + what + ": thread " + std::to_string(tstate.linear) +
                            " of block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + ") at " +
                            file + ":" + std::to_string(line) + " while others wait at " + file_ + ":" +
                            std::to_string(line_);
    lk.unlock();
    launch_->fail(msg);
    return false;
  }
  if (++count_ == n_) {
    count_ = 0;
    ++gen_;
    cv_.notify_all();
  }
  return true;
}

inline bool Barrier::wait_phase(uint64_t g, const char* file, int line, const char* what) {
  std::unique_lock<std::mutex> lk(mu_);
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout_s()));
  while (gen_ == g) {
    if (launch_->is_broken()) return false;
    if (cv_.wait_until(lk, deadline) == std::cv_status::timeout && gen_ == g) {
      const std::string msg = std::string("deadlock: ") + what + " at " + file + ":" + std::to_string(line) +
                              " not reached by every thread of the block/warp/cluster within " +
                              std::to_string(timeout_s()) + " s";
      lk.unlock();
      launch_->fail(msg);
      return false;
    }
  }
  return true;
}

// ---- __syncthreads, __syncwarp, shuffles ---------------------------------------------------------------
inline void syncthreads(const char* file, int line) { tstate.cta->block_bar.wait(file, line, "__syncthreads()"); }

inline Warp& my_warp() { return *tstate.cta->warps[tstate.linear / 32]; }

inline bool check_mask(unsigned mask, const char* file, int line, const char* what) {
  const Warp& w = my_warp();
  const unsigned full = w.lanes == 32 ? 0xffffffffu : ((1u << w.lanes) - 1u);
  if (mask != full) {
    tstate.launch->fail(std::string(what) + " at " + file + ":" + std::to_string(line) +
                        ": the emulator supports only masks naming every lane of the warp");
    return false;
  }
  return true;
}

inline void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu) {
  if (check_mask(mask, file, line, "__syncwarp")) my_warp().bar.wait(file, line, "__syncwarp()");
}

// src_of(lane) -> source lane, or -1 for "keep my own value".
template <class T, class F>
T shuffle(const char* file, int line, const char* what, unsigned mask, T v, int width, F src_of) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move at most 8 bytes");
  if (width != 32) {
    tstate.launch->fail(std::string(what) + " at " + file + ":" + std::to_string(line) +
                        ": the emulator supports only width 32");
    return v;
  }
  if (!check_mask(mask, file, line, what)) return v;
  Warp& w = my_warp();
  const int lane = tstate.linear % 32;
  memcpy(&w.slot[lane], &v, sizeof(T));
  if (!w.bar.wait(file, line, what)) return v;
  const int src = src_of(lane);
  T r = v;
  if (src >= 0 && src < w.lanes) memcpy(&r, &w.slot[src], sizeof(T));
  w.bar.wait(file, line, what);  // nobody overwrites a slot before every lane has read it
  return r;
}

// ---- shared memory ---------------------------------------------------------------------------------
template <class T>
T* shared_array(size_t n, const char* file, int line) {
  static_assert(std::is_trivially_default_constructible<T>::value && std::is_trivially_destructible<T>::value,
                "shared memory holds trivial types only");
  size_t off = (tstate.shared_offset + alignof(T) - 1) / alignof(T) * alignof(T);
  if (off + n * sizeof(T) > kSharedBytes) {
    tstate.launch->fail(std::string("GK_SHARED at ") + file + ":" + std::to_string(line) + ": more than 48 KiB");
    off = 0;
  }
  tstate.shared_offset = off + n * sizeof(T);
  return reinterpret_cast<T*>(tstate.cta->base() + off);
}

template <class T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(tstate.cta->base() + kSharedBytes);
}

// ---- clusters ----------------------------------------------------------------------------------------
inline void cluster_arrive(const char* file, int line, uint64_t* phase) {
  tstate.launch->cluster_bar.arrive(file, line, "cluster barrier (arrive)", phase);
}
inline void cluster_wait(uint64_t phase, const char* file, int line) {
  tstate.launch->cluster_bar.wait_phase(phase, file, line, "cluster barrier (wait)");
}

template <class T>
T* map_shared_rank(T* p, int rank, const char* file, int line) {
  Launch& L = *tstate.launch;
  unsigned char* const mine = tstate.cta->base();
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(mine);
  if (a < b || a >= b + tstate.cta->bytes() || rank < 0 || rank >= L.ncta) {
    L.fail(std::string("map_shared_rank at ") + file + ":" + std::to_string(line) + ": " +
           (rank < 0 || rank >= L.ncta ? "rank " + std::to_string(rank) + " outside the cluster of " +
                                             std::to_string(L.ncta)
                                       : std::string("the pointer is not in this block's shared memory")));
    return p;
  }
  return reinterpret_cast<T*>(L.ctas[rank]->base() + (a - b));
}

// ---- device and launch configuration -------------------------------------------------------------------
struct DeviceCC {
  int major = 9, minor = 0;
};
inline DeviceCC& device_cc() {
  static DeviceCC cc;
  return cc;
}
// The compute capability cudaDeviceGetAttribute reports (tests set 8.0 to check an sm_80 dispatch).
inline void set_device_cc(int major, int minor) {
  device_cc().major = major;
  device_cc().minor = minor;
}

struct LaunchRecord {
  dim3 grid, block, cluster;
  size_t dyn_smem = 0;
  uint64_t count = 0;  // launches so far (successful or not)
};
inline LaunchRecord& launch_record() {
  static LaunchRecord r;
  return r;
}
inline LaunchRecord last_launch() {
  std::lock_guard<std::mutex> lk(error_mutex());
  return launch_record();
}

inline std::mutex& func_attr_mutex() {
  static std::mutex m;
  return m;
}
inline std::vector<std::pair<const void*, size_t>>& max_dyn_smem() {
  static std::vector<std::pair<const void*, size_t>> v;
  return v;
}
inline size_t max_dyn_smem_of(const void* k) {
  std::lock_guard<std::mutex> lk(func_attr_mutex());
  for (auto& e : max_dyn_smem())
    if (e.first == k) return e.second;
  return kSharedBytes;
}

// ---- launch ----------------------------------------------------------------------------------------
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline void set_error(cudaError_t e, const std::string& msg) {
  std::lock_guard<std::mutex> lk(error_mutex());
  if (last_error() == cudaSuccess) {
    last_error() = e;
    error_message() = msg;
  }
}

// Runs kernel(args...) over grid x block in clusters of `cluster` blocks, as described at the top of this
// file. Arguments are converted to the kernel's parameter types once (as the CUDA runtime copies them) and
// shared read-only by all threads.
template <class... P, class... A>
void launch_cluster(void (*kernel)(P...), dim3 grid, dim3 block, dim3 cluster, size_t dyn_smem, cudaStream_t,
                    A&&... args) {
  {
    std::lock_guard<std::mutex> lk(error_mutex());
    LaunchRecord& r = launch_record();
    r.grid = grid;
    r.block = block;
    r.cluster = cluster;
    r.dyn_smem = dyn_smem;
    ++r.count;
  }
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  const uint64_t ncta = uint64_t(cluster.x) * cluster.y * cluster.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu) {
    set_error(cudaErrorInvalidConfiguration, "invalid launch configuration");
    return;
  }
  if (ncta == 0 || ncta > kMaxCluster || grid.x % cluster.x || grid.y % cluster.y || grid.z % cluster.z) {
    set_error(cudaErrorInvalidConfiguration, "invalid cluster: at most 8 blocks, the grid a multiple of it");
    return;
  }
  if (dyn_smem > max_dyn_smem_of(reinterpret_cast<const void*>(kernel)) || dyn_smem > kMaxSharedPerBlock) {
    set_error(cudaErrorInvalidValue, "dynamic shared memory above the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize");
    return;
  }
  if (nblocks == 0) {
    set_error(cudaErrorInvalidConfiguration, "empty grid");
    return;
  }
  const std::tuple<P...> params(std::forward<A>(args)...);
  std::lock_guard<std::mutex> serial(launch_mutex());
  std::unique_ptr<Launch> L(new Launch(int(nthreads), cluster, dyn_smem));
  const dim3 ngrid(grid.x / cluster.x, grid.y / cluster.y, grid.z / cluster.z);  // clusters per dimension
  const uint64_t nclusters = nblocks / ncta;
  auto body = [&](int rank, int linear) {
    Cta* const cta = L->ctas[rank].get();
    tstate.launch = L.get();
    tstate.cta = cta;
    tstate.rank = rank;
    tstate.linear = linear;
    threadIdx = uint3{unsigned(linear % block.x), unsigned(linear / block.x % block.y),
                      unsigned(linear / (block.x * block.y))};
    blockDim = block;
    gridDim = grid;
    const unsigned ri = rank % cluster.x, rj = rank / cluster.x % cluster.y, rk = rank / (cluster.x * cluster.y);
    for (uint64_t c = 0; c < nclusters; ++c) {
      if (linear == 0) memset(cta->base(), 0xff, cta->bytes());  // fresh, garbage shared memory per block
      L->cluster_bar.wait(__FILE__, __LINE__, "start of cluster");
      if (L->is_broken()) break;
      const unsigned cx = unsigned(c % ngrid.x), cy = unsigned(c / ngrid.x % ngrid.y),
                     cz = unsigned(c / (uint64_t(ngrid.x) * ngrid.y));
      blockIdx = uint3{cx * cluster.x + ri, cy * cluster.y + rj, cz * cluster.z + rk};
      tstate.shared_offset = 0;
      std::apply(kernel, params);
      cta->block_bar.wait(__FILE__, __LINE__, "end of block (a thread returned while others wait at a barrier?)");
      // the block has exited: its shared memory is gone (a peer still reading it raced with this write)
      if (ncta > 1 && linear == 0) memset(cta->base(), 0xff, cta->bytes());
      L->cluster_bar.wait(__FILE__, __LINE__, "end of cluster (a block returned while others wait at a barrier?)");
    }
    tstate.launch = nullptr;
    tstate.cta = nullptr;
  };
  std::vector<std::thread> threads;
  threads.reserve(nthreads * ncta);
  for (int r = 0; r < int(ncta); ++r)
    for (int t = 0; t < int(nthreads); ++t) threads.emplace_back(body, r, t);
  for (auto& t : threads) t.join();
  if (L->broken) set_error(cudaErrorLaunchFailure, L->message);
}

template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t dyn_smem, cudaStream_t s, A&&... args) {
  launch_cluster(kernel, grid, block, dim3(1, 1, 1), dyn_smem, s, std::forward<A>(args)...);
}

}  // namespace gk_emu

// ---- runtime API: device attributes, kernel attributes, cudaLaunchKernelEx -------------------------------
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (a) {
    case cudaDevAttrComputeCapabilityMajor: *v = gk_emu::device_cc().major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *v = gk_emu::device_cc().minor; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *v = 132; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = int(gk_emu::kMaxSharedPerBlock); return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <class... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || size_t(value) > gk_emu::kMaxSharedPerBlock)
    return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lk(gk_emu::func_attr_mutex());
  const void* k = reinterpret_cast<const void*>(kernel);
  for (auto& e : gk_emu::max_dyn_smem())
    if (e.first == k) {
      e.second = size_t(value);
      return cudaSuccess;
    }
  gk_emu::max_dyn_smem().emplace_back(k, size_t(value));
  return cudaSuccess;
}

struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

// Launches like the runtime's (runs to completion here); the launch error is also returned, as the
// runtime returns configuration errors from cudaLaunchKernelEx itself.
template <class... P, class... A>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(P...), A&&... args) {
  dim3 cluster(1, 1, 1);
  for (unsigned i = 0; i < cfg->numAttrs; ++i) {
    if (cfg->attrs[i].id != cudaLaunchAttributeClusterDimension) return cudaErrorInvalidValue;
    cluster = dim3(cfg->attrs[i].val.clusterDim.x, cfg->attrs[i].val.clusterDim.y, cfg->attrs[i].val.clusterDim.z);
  }
  gk_emu::launch_cluster(kernel, cfg->gridDim, cfg->blockDim, cluster, cfg->dynamicSmemBytes, cfg->stream,
                         std::forward<A>(args)...);
  return cudaPeekAtLastError();
}

// ---- cooperative_groups::this_cluster() ----------------------------------------------------------------
namespace cooperative_groups {
struct cluster_group {
  static unsigned block_rank() { return unsigned(gk_emu::tstate.rank); }
  static unsigned num_blocks() { return unsigned(gk_emu::tstate.launch->ncta); }
  static dim3 dim_blocks() { return gk_emu::tstate.launch->cluster; }
  // The call site identifies the barrier (as __FILE__ / __LINE__ do for __syncthreads).
  static void sync(std::source_location w = std::source_location::current()) {
    uint64_t g;
    gk_emu::cluster_arrive(w.file_name(), int(w.line()), &g);
    gk_emu::cluster_wait(g, w.file_name(), int(w.line()));
  }
  // barrier.cluster.arrive (release): the phase is kept per thread for the matching barrier_wait()
  static void barrier_arrive(std::source_location w = std::source_location::current()) {
    gk_emu::cluster_arrive(w.file_name(), int(w.line()), &phase());
  }
  static void barrier_wait(std::source_location w = std::source_location::current()) {
    gk_emu::cluster_wait(phase(), w.file_name(), int(w.line()));
  }
  template <class T>
  static T* map_shared_rank(T* p, int rank, std::source_location w = std::source_location::current()) {
    return gk_emu::map_shared_rank(p, rank, w.file_name(), int(w.line()));
  }

 private:
  static uint64_t& phase() {
    static thread_local uint64_t g = 0;
    return g;
  }
};
inline cluster_group this_cluster() { return cluster_group(); }
}  // namespace cooperative_groups

#define __syncthreads() ::gk_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::gk_emu::syncwarp(__FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, v, lane_mask, ...)                                                  \
  ::gk_emu::shuffle(__FILE__, __LINE__, "__shfl_xor_sync", (mask), (v), gk_emu_width(__VA_ARGS__), \
                    [&](int lane_) { return lane_ ^ int(lane_mask); })
#define __shfl_down_sync(mask, v, delta, ...)                                                      \
  ::gk_emu::shuffle(__FILE__, __LINE__, "__shfl_down_sync", (mask), (v), gk_emu_width(__VA_ARGS__), \
                    [&](int lane_) { return lane_ + int(delta) < 32 ? lane_ + int(delta) : -1; })
#define __shfl_sync(mask, v, src_lane, ...)                                                  \
  ::gk_emu::shuffle(__FILE__, __LINE__, "__shfl_sync", (mask), (v), gk_emu_width(__VA_ARGS__), \
                    [&](int) { return int(src_lane) & 31; })
inline int gk_emu_width(int w = 32) { return w; }

// GK_SHARED(name, T, N): `__shared__ T name[N]` on the GPU; here a pointer into the block's arena.
#define GK_SHARED(name, T, N) T* const name = ::gk_emu::shared_array<T>((N), __FILE__, __LINE__)
// GK_DYN_SHARED(name, T): `extern __shared__ T name[]` (the launch's dynamic shared memory).
#define GK_DYN_SHARED(name, T) T* const name = ::gk_emu::dynamic_shared<T>()
#define GK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::gk_emu::launch(kernel, dim3(grid), dim3(block), (smem), (stream), __VA_ARGS__)
