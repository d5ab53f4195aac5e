//! Allocator settings of our programs, applied once at start, before any thread exists.
//!
//! glibc's malloc gives threads that contend for the heap arenas of their own (up to eight
//! per core) and seldom returns what is freed in them to the system. With RocksDB's and
//! tokio's threads, a storage node's resident memory grew far past what it had in use: at
//! 10^6 chunks, heaptrack counted a peak of 253 MiB of heap on a follower during a GC pass
//! whose RSS reached 420 - 505 MiB. Two arenas bring the nodes to 268 - 314 MiB in the same
//! benchmark (`GC=1 JOIN=0 bench/scale.sh 1000000 30 100000`) at the same CPU.

/// Arenas malloc may use; an operator's `MALLOC_ARENA_MAX` wins.
const ARENAS: i32 = 2;

/// Caps glibc's malloc arenas (a no-op elsewhere, or when `MALLOC_ARENA_MAX` is set).
pub fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes a malloc parameter; called before any other thread.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        }
    }
}
