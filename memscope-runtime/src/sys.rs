//! What the runtime asks of the operating system, outside the hot path: environment,
//! thread names and ids, stack bounds, loaded modules, which pages were ever written.
//! Nothing here allocates through the global allocator except where noted.

use std::ffi::CStr;

/// An environment variable read without allocating (std's `env::var` allocates).
pub fn getenv(name: &CStr) -> Option<&'static [u8]> {
    // SAFETY: `name` is NUL-terminated; getenv returns NULL or a pointer into the
    // environment block, which lives for the whole process (memscope never modifies
    // the environment, and Rust's `set_var` is unsafe for exactly this reason).
    let value = unsafe { libc::getenv(name.as_ptr()) };
    if value.is_null() {
        None
    } else {
        // SAFETY: non-null getenv results are NUL-terminated strings (see above).
        Some(unsafe { CStr::from_ptr(value) }.to_bytes())
    }
}

/// The kernel's id of the calling thread.
pub fn os_tid() -> u64 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as u64 }
}

/// The calling thread's name as the OS keeps it (at most 15 bytes on Linux). std's own
/// handle is not asked: `thread::current()` may allocate, abort or panic when called
/// from inside an allocator.
pub fn thread_name(out: &mut [u8; 16]) -> usize {
    *out = [0; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into `out`.
    let rc = unsafe {
        libc::prctl(
            libc::PR_GET_NAME,
            out.as_mut_ptr() as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return 0;
    }
    out.iter().position(|&b| b == 0).unwrap_or(16)
}

/// The calling thread's stack, `(lowest address, highest address (exclusive))`, or
/// `(0, 0)` when unknown, in which case no stack is walked.
pub fn stack_bounds() -> (usize, usize) {
    // SAFETY: pthread_attr_t is plain data; zeroed is a valid "uninitialised" value
    // that pthread_getattr_np initialises.
    let mut attr: libc::pthread_attr_t = unsafe { std::mem::zeroed() };
    // SAFETY: `attr` is writable; on success it is initialised and destroyed below.
    if unsafe { libc::pthread_getattr_np(libc::pthread_self(), &mut attr) } != 0 {
        return (0, 0);
    }
    let mut addr: *mut libc::c_void = std::ptr::null_mut();
    let mut size: libc::size_t = 0;
    // SAFETY: `attr` was initialised by pthread_getattr_np; outputs are writable.
    let rc = unsafe { libc::pthread_attr_getstack(&attr, &mut addr, &mut size) };
    // SAFETY: `attr` was initialised above and is not used afterwards.
    unsafe { libc::pthread_attr_destroy(&mut attr) };
    if rc != 0 {
        return (0, 0);
    }
    (addr as usize, addr as usize + size)
}

/// The writable segments (static data) of every loaded object but the C library and
/// the dynamic loader, `[start, end)`. Allocates; call only from memscope's slow paths.
pub fn static_data() -> Vec<(usize, usize)> {
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info pointer, and `data` is the
        // `&mut Vec<(usize, usize)>` given below, alive for the whole iteration.
        let (info, out) = unsafe { (&*info, &mut *(data as *mut Vec<(usize, usize)>)) };
        if !info.dlpi_name.is_null() {
            // SAFETY: non-null `dlpi_name` is a NUL-terminated string.
            let name = unsafe { CStr::from_ptr(info.dlpi_name) }.to_bytes();
            let file = name.rsplit(|&b| b == b'/').next().unwrap_or(name);
            if file.starts_with(b"libc.so")
                || file.starts_with(b"ld-")
                || file.starts_with(b"linux-vdso")
            {
                return 0;
            }
        }
        for i in 0..info.dlpi_phnum as usize {
            // SAFETY: `dlpi_phdr` points to `dlpi_phnum` program headers.
            let ph = unsafe { &*info.dlpi_phdr.add(i) };
            if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_W != 0 {
                let start = (info.dlpi_addr + ph.p_vaddr) as usize;
                out.push((start, start + ph.p_memsz as usize));
            }
        }
        0
    }
    let mut out: Vec<(usize, usize)> = Vec::new();
    // SAFETY: `visit` matches the callback type and only uses `data` as the Vec above.
    unsafe {
        libc::dl_iterate_phdr(
            Some(visit),
            &mut out as *mut Vec<(usize, usize)> as *mut libc::c_void,
        )
    };
    out
}

/// A loaded object file: its path and where it was mapped.
pub struct Module {
    pub path: String,
    pub bias: u64,
    pub start: u64,
    pub end: u64,
}

/// Every object mapped into the process (the executable first). Allocates; call only
/// from memscope's slow paths.
pub fn modules() -> Vec<Module> {
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info pointer, and `data` is the
        // `&mut Vec<Module>` given below, alive for the whole iteration.
        let (info, out) = unsafe { (&*info, &mut *(data as *mut Vec<Module>)) };
        let mut start = u64::MAX;
        let mut end = 0;
        for i in 0..info.dlpi_phnum as usize {
            // SAFETY: `dlpi_phdr` points to `dlpi_phnum` program headers.
            let ph = unsafe { &*info.dlpi_phdr.add(i) };
            if ph.p_type == libc::PT_LOAD {
                start = start.min(ph.p_vaddr);
                end = end.max(ph.p_vaddr + ph.p_memsz);
            }
        }
        if start == u64::MAX {
            return 0;
        }
        let name = if info.dlpi_name.is_null() {
            String::new()
        } else {
            // SAFETY: non-null `dlpi_name` is a NUL-terminated string.
            unsafe { CStr::from_ptr(info.dlpi_name) }
                .to_string_lossy()
                .into_owned()
        };
        let path = if name.is_empty() && out.is_empty() {
            exe_path()
        } else {
            name
        };
        if !path.is_empty() && !path.starts_with("linux-vdso") {
            let bias = info.dlpi_addr;
            out.push(Module {
                path,
                bias,
                start: bias + start,
                end: bias + end,
            });
        }
        0
    }
    let mut out: Vec<Module> = Vec::new();
    // SAFETY: `visit` matches the callback type and only uses `data` as the Vec above.
    unsafe {
        libc::dl_iterate_phdr(
            Some(visit),
            &mut out as *mut Vec<Module> as *mut libc::c_void,
        )
    };
    out
}

fn exe_path() -> String {
    std::fs::read_link("/proc/self/exe")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The parts of `[start, end)` on pages that were ever written, as far as
/// `/proc/self/pagemap` tells: a page neither in memory nor swapped out was never
/// touched and holds only zeros (a thread's stack is mostly such pages). `None` when
/// the kernel does not say. Allocates; call only from memscope's slow paths.
pub fn written_parts(start: usize, end: usize) -> Option<Vec<(usize, usize)>> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    /// Bits of a pagemap entry: the page is in memory; it is swapped out.
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    // SAFETY: sysconf only reads a system value.
    if end <= start || unsafe { libc::sysconf(libc::_SC_PAGESIZE) } != PAGE as libc::c_long {
        return None;
    }
    let pagemap = std::fs::File::open("/proc/self/pagemap").ok()?;
    let (first, last) = (start / PAGE, (end - 1) / PAGE);
    let mut entries = vec![0u8; (last - first + 1) * 8];
    pagemap
        .read_exact_at(&mut entries, (first * 8) as u64)
        .ok()?;
    let mut parts: Vec<(usize, usize)> = Vec::new();
    for (i, entry) in entries.chunks_exact(8).enumerate() {
        let entry = u64::from_le_bytes(entry.try_into().ok()?);
        if entry & (PRESENT | SWAPPED) == 0 {
            continue;
        }
        let page = (first + i) * PAGE;
        let (from, to) = (page.max(start), (page + PAGE).min(end));
        match parts.last_mut() {
            Some(last) if last.1 == from => last.1 = to,
            _ => parts.push((from, to)),
        }
    }
    Some(parts)
}

/// A fresh private anonymous mapping, readable and writable, unmapped when dropped:
/// memory of which no page was ever written.
#[cfg(test)]
pub(crate) struct Mapping {
    pub start: usize,
    pub len: usize,
}

#[cfg(test)]
impl Mapping {
    pub fn new(len: usize) -> Mapping {
        // SAFETY: asks for a new mapping; touches no existing memory.
        let start = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(start, libc::MAP_FAILED, "mmap of {len} bytes failed");
        Mapping {
            start: start as usize,
            len,
        }
    }

    /// Writes `value` at `offset` bytes into the mapping.
    pub fn write(&self, offset: usize, value: u64) {
        assert!(offset + 8 <= self.len);
        // SAFETY: inside the mapping, which is writable, and 8 bytes fit.
        unsafe { ((self.start + offset) as *mut u64).write_unaligned(value) };
    }
}

#[cfg(test)]
impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, which nothing uses any more.
        unsafe { libc::munmap(self.start as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pages_written_are_parts_of_a_fresh_mapping() {
        const PAGE: usize = 4096;
        let mapping = Mapping::new(16 * PAGE);
        for page in [2, 3, 9] {
            mapping.write(page * PAGE + 8, 7);
        }
        let (base, end) = (mapping.start, mapping.start + mapping.len);
        assert_eq!(
            written_parts(base, end),
            Some(vec![
                (base + 2 * PAGE, base + 4 * PAGE),
                (base + 9 * PAGE, base + 10 * PAGE)
            ])
        );
        // A range that starts and ends inside written pages is cut at its ends.
        assert_eq!(
            written_parts(base + 3 * PAGE - 40, base + 9 * PAGE + 16),
            Some(vec![
                (base + 3 * PAGE - 40, base + 4 * PAGE),
                (base + 9 * PAGE, base + 9 * PAGE + 16)
            ])
        );
        assert_eq!(written_parts(base + 10 * PAGE, end), Some(Vec::new()));
    }
}
