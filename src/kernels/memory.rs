//! The allocator's side of memory use: large buffers go straight to `mmap`
//! (so freeing them returns the pages at once), and an idle engine hands free
//! heap pages back to the OS. glibc only; elsewhere both are no-ops.

/// Allocations of at least this many bytes are mapped, not carved from the heap.
const MMAP_THRESHOLD_BYTES: i32 = 1 << 20;

/// Fixes glibc's mmap threshold (its default grows after the first large free,
/// after which big buffers come from the heap and stay resident). Once per process.
pub fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator parameters; M_MMAP_THRESHOLD
        // with a positive value is valid at any time.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        }
    });
}

/// Returns free heap pages of every arena to the OS (after a burst).
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is thread-safe.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}
