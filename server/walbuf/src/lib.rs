//! A SQLite VFS that hands each transaction's WAL frames to the kernel in
//! one write instead of two per page.
//!
//! SQLite appends a WAL frame as two `pwrite`s, its 24-byte header and then
//! its page, so a frame straddles the kernel's 4 KiB pages and every frame
//! costs two system calls and three page-cache updates. Herald's writer
//! commits groups of notifications to random users, a few pages each, and
//! those writes were the largest item of its profile (docs/BENCHMARKS.md).
//! This VFS wraps the default one ("unix") and, for a WAL file, keeps a run
//! of contiguous writes in memory and writes it with one call.
//!
//! What it guarantees, whatever SQLite asks of the file:
//! - The same bytes reach the file at the same offsets, in an order that
//!   gives the same result; only the number of calls changes. A write that
//!   does not continue the run flushes the run first (one that falls inside
//!   it replaces those bytes in memory, as the write would have in the file).
//! - Nothing is held across `xSync`, `xRead`, `xTruncate`, `xFileSize`,
//!   `xFileControl` or `xClose` of the WAL: each flushes first. A commit
//!   with `synchronous=FULL` syncs the WAL before it publishes the new
//!   frames to other connections, so they never read a frame that is only
//!   in this buffer.
//! - Nothing is held once the connection releases a lock on the WAL index
//!   (`xShmLock` of its database file): that is how a write transaction
//!   ends, committed or rolled back. Frames a rolled-back transaction had
//!   spilled are therefore written before another connection can take the
//!   write lock and append where they were, as the unix VFS would have
//!   written them at once; they can never land on top of its frames later.
//! - A failed flush returns its error to the call that caused it (a commit's
//!   `xSync` fails, so the commit does), and the run is dropped. A lock is
//!   released even when the flush before it failed.
//! - A WAL whose database was not opened through this VFS (so the lock
//!   release would not reach it) is not buffered at all.
//!
//! Only connections opened with [`NAME`] use it; others on the same file use
//! the default VFS beside it (locks and the WAL index are the unix VFS's own).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::mem::{align_of, size_of};
use std::ptr::{self, null_mut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use libsqlite3_sys as ffi;

/// The VFS's name, for `sqlite3_open_v2` (rusqlite's `open_with_flags_and_vfs`).
pub const NAME: &str = "herald-walbuf";
const NAME_C: &CStr = c"herald-walbuf";

/// A run longer than this is written at once (a group commit of 2,048
/// notifications is ≈25 MiB of frames).
const MAX_RUN: usize = 4 << 20;
/// The most one call to the unix VFS's `xWrite` takes: it writes at most
/// 128 KiB − 1 bytes per call (SQLite itself never asks for more than a
/// page). 64 KiB pieces keep nearly all of the gain (docs/BENCHMARKS.md).
const MAX_WRITE: usize = 64 << 10;

/// Writes this VFS made to WAL files, and the bytes they carried, since the
/// process started (all connections): what the tests check coalescing by.
pub fn wal_writes() -> (u64, u64) {
    (WAL_WRITES.load(Ordering::Relaxed), WAL_BYTES.load(Ordering::Relaxed))
}

static WAL_WRITES: AtomicU64 = AtomicU64::new(0);
static WAL_BYTES: AtomicU64 = AtomicU64::new(0);

/// Registers the VFS (once per process; not as the default). Returns the
/// SQLite error code if that failed.
pub fn register() -> Result<(), c_int> {
    static REGISTERED: OnceLock<Result<(), c_int>> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        // SAFETY: sqlite3_vfs_find initialises SQLite if needed and returns
        // the default VFS, which lives for the whole process, or null.
        let base = unsafe { ffi::sqlite3_vfs_find(ptr::null()) };
        if base.is_null() {
            return Err(ffi::SQLITE_ERROR);
        }
        // SAFETY: base is a valid VFS (above); the struct is plain data.
        let mut vfs: ffi::sqlite3_vfs = unsafe { *base };
        vfs.iVersion = 2;
        vfs.szOsFile += c_int::try_from(INNER_OFFSET).expect("small");
        vfs.pNext = null_mut();
        vfs.zName = NAME_C.as_ptr();
        vfs.pAppData = base.cast();
        vfs.xOpen = Some(open);
        vfs.xDelete = Some(delete);
        vfs.xAccess = Some(access);
        vfs.xFullPathname = Some(full_pathname);
        vfs.xDlOpen = Some(dl_open);
        vfs.xDlError = Some(dl_error);
        vfs.xDlSym = Some(dl_sym);
        vfs.xDlClose = Some(dl_close);
        vfs.xRandomness = Some(randomness);
        vfs.xSleep = Some(sleep);
        vfs.xCurrentTime = Some(current_time);
        vfs.xGetLastError = Some(get_last_error);
        vfs.xCurrentTimeInt64 = Some(current_time_int64);
        vfs.xSetSystemCall = None;
        vfs.xGetSystemCall = None;
        vfs.xNextSystemCall = None;
        let vfs = Box::leak(Box::new(vfs));
        // SAFETY: vfs is valid for the rest of the process (leaked).
        match unsafe { ffi::sqlite3_vfs_register(vfs, 0) } {
            ffi::SQLITE_OK => Ok(()),
            rc => Err(rc),
        }
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Main,
    Wal,
}

/// What SQLite allocates for a file opened through this VFS (`szOsFile`
/// bytes): this header, then the default VFS's own file at [`INNER_OFFSET`].
#[repr(C)]
struct File {
    /// Its `pMethods` are [`METHODS`].
    base: ffi::sqlite3_file,
    inner: *mut ffi::sqlite3_file,
    kind: Kind,
    /// Main database: its WAL, while open through this VFS.
    wal: *mut File,
    /// WAL: its main database.
    db: *mut File,
    /// WAL: bytes written but not yet passed on, for offsets from `run_start`.
    run: Vec<u8>,
    run_start: i64,
}

const INNER_OFFSET: usize = size_of::<File>().next_multiple_of(16);
const _: () = assert!(align_of::<File>() <= 8, "SQLite allocates files 8-aligned");

fn base_vfs(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    // SAFETY: vfs is the one registered above, whose pAppData is the default VFS.
    unsafe { (*vfs).pAppData.cast() }
}

/// Calls method `$m` of the default VFS with `$args`.
macro_rules! base_call {
    ($vfs:expr, $m:ident, $default:expr $(, $arg:expr)*) => {{
        let base = base_vfs($vfs);
        // SAFETY: the default VFS outlives every call; its methods take
        // their own VFS pointer and the caller's arguments unchanged.
        match unsafe { (*base).$m } {
            // SAFETY: as above; the arguments are SQLite's, passed on.
            Some(f) => unsafe { f(base $(, $arg)*) },
            None => $default,
        }
    }};
}

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let kind = if flags & ffi::SQLITE_OPEN_MAIN_DB != 0 {
        Kind::Main
    } else if flags & ffi::SQLITE_OPEN_WAL != 0 {
        Kind::Wal
    } else {
        // Journals and temporary files: the default VFS's file as it is,
        // in the (larger) space SQLite gave us.
        return base_call!(vfs, xOpen, ffi::SQLITE_CANTOPEN, name, file, flags, out_flags);
    };
    // SAFETY: SQLite gave us szOsFile bytes at file, room for the header and
    // the inner file after it.
    let inner = unsafe { file.cast::<u8>().add(INNER_OFFSET).cast::<ffi::sqlite3_file>() };
    let rc = base_call!(vfs, xOpen, ffi::SQLITE_CANTOPEN, name, inner, flags, out_flags);
    if rc != ffi::SQLITE_OK {
        // SAFETY: as above; SQLite requires pMethods set, null after a failure.
        unsafe { (*file).pMethods = ptr::null() };
        return rc;
    }
    let this = file.cast::<File>();
    let file_header = File {
        base: ffi::sqlite3_file { pMethods: &METHODS },
        inner,
        kind,
        wal: null_mut(),
        db: null_mut(),
        run: Vec::new(),
        run_start: 0,
    };
    // SAFETY: the space is ours and uninitialised; written once, dropped in close.
    unsafe { ptr::write(this, file_header) };
    if kind == Kind::Wal {
        // SAFETY: name is the WAL name SQLite passed to xOpen, which is what
        // sqlite3_database_file_object takes; it returns the main database's
        // file, open for as long as its WAL is.
        let db = unsafe { ffi::sqlite3_database_file_object(name) }.cast::<File>();
        // SAFETY: db is a valid sqlite3_file; only ours have METHODS, and
        // this one is a main database.
        if !db.is_null() && unsafe { ptr::eq((*db).base.pMethods, &METHODS) } {
            // SAFETY: both are ours and initialised; one connection uses them
            // at a time (SQLite serialises a connection's calls).
            unsafe {
                (*db).wal = this;
                (*this).db = db;
            }
        }
    }
    ffi::SQLITE_OK
}

/// The header of one of our files.
///
/// # Safety
/// `file` was opened by [`open`] as a main database or WAL and not closed.
unsafe fn this<'a>(file: *mut ffi::sqlite3_file) -> &'a mut File {
    // SAFETY: the caller's contract.
    unsafe { &mut *file.cast::<File>() }
}

/// Writes out the WAL's run, if any, in pieces of [`MAX_WRITE`].
fn flush(wal: &mut File) -> c_int {
    let mut rc = ffi::SQLITE_OK;
    let mut offset = wal.run_start;
    for piece in wal.run.chunks(MAX_WRITE) {
        // SAFETY: inner is the open default-VFS file; piece is valid for its length (≤ MAX_WRITE).
        rc = unsafe {
            match (*(*wal.inner).pMethods).xWrite {
                Some(write) => write(wal.inner, piece.as_ptr().cast(), piece.len() as c_int, offset),
                None => ffi::SQLITE_IOERR_WRITE,
            }
        };
        WAL_WRITES.fetch_add(1, Ordering::Relaxed);
        WAL_BYTES.fetch_add(piece.len() as u64, Ordering::Relaxed);
        if rc != ffi::SQLITE_OK {
            break;
        }
        offset += piece.len() as i64;
    }
    wal.run.clear();
    rc
}

/// Flushes the run of a main database's WAL, if it has one open through us.
fn flush_wal_of(db: &mut File) -> c_int {
    if db.wal.is_null() {
        return ffi::SQLITE_OK;
    }
    // SAFETY: a linked WAL is open (its close unlinks it).
    flush(unsafe { &mut *db.wal })
}

/// The default VFS's method `$m` of `$file`'s inner file.
macro_rules! inner_call {
    ($file:expr, $m:ident, $default:expr $(, $arg:expr)*) => {{
        let inner = $file.inner;
        // SAFETY: inner is open with the default VFS's methods until close.
        match unsafe { (*(*inner).pMethods).$m } {
            // SAFETY: as above; the arguments are SQLite's, passed on.
            Some(f) => unsafe { f(inner $(, $arg)*) },
            None => $default,
        }
    }};
}

/// A method that, on a WAL, flushes first (and fails with the flush's
/// error, not doing what needs the data); then passes the call on.
macro_rules! passing_on {
    ($name:ident, $m:ident, $default:expr, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> $ret {
            // SAFETY: SQLite calls methods only on files its xOpen opened.
            let this = unsafe { this(file) };
            if this.kind == Kind::Wal {
                let rc = flush(this);
                if rc != ffi::SQLITE_OK {
                    return rc;
                }
            }
            inner_call!(this, $m, $default $(, $arg)*)
        }
    };
}

passing_on!(read, xRead, ffi::SQLITE_IOERR_READ, (buf: *mut c_void, amount: c_int, offset: i64) -> c_int);
passing_on!(truncate, xTruncate, ffi::SQLITE_IOERR_TRUNCATE, (size: i64) -> c_int);
passing_on!(sync, xSync, ffi::SQLITE_IOERR_FSYNC, (flags: c_int) -> c_int);
passing_on!(file_size, xFileSize, ffi::SQLITE_IOERR_FSTAT, (size: *mut i64) -> c_int);
passing_on!(lock, xLock, ffi::SQLITE_IOERR_LOCK, (level: c_int) -> c_int);
passing_on!(unlock, xUnlock, ffi::SQLITE_IOERR_UNLOCK, (level: c_int) -> c_int);
passing_on!(check_reserved_lock, xCheckReservedLock, ffi::SQLITE_IOERR_CHECKRESERVEDLOCK, (out: *mut c_int) -> c_int);
passing_on!(file_control, xFileControl, ffi::SQLITE_NOTFOUND, (op: c_int, arg: *mut c_void) -> c_int);
passing_on!(shm_map, xShmMap, ffi::SQLITE_IOERR_SHMMAP, (page: c_int, size: c_int, extend: c_int, out: *mut *mut c_void) -> c_int);
passing_on!(fetch, xFetch, ffi::SQLITE_OK, (offset: i64, amount: c_int, out: *mut *mut c_void) -> c_int);
passing_on!(unfetch, xUnfetch, ffi::SQLITE_OK, (offset: i64, page: *mut c_void) -> c_int);

/// Releasing a lock on the WAL index (of the main database) is how a write
/// transaction ends, committed or rolled back: the WAL's run is written
/// first. The lock is released whatever that write did (the run then holds
/// no committed frame: a commit's were written at its sync), so a failed
/// write cannot leave other connections waiting.
unsafe extern "C" fn shm_lock(file: *mut ffi::sqlite3_file, offset: c_int, n: c_int, flags: c_int) -> c_int {
    // SAFETY: SQLite calls methods only on files its xOpen opened.
    let this = unsafe { this(file) };
    let flushed = if flags & ffi::SQLITE_SHM_UNLOCK != 0 { flush_wal_of(this) } else { ffi::SQLITE_OK };
    let rc = inner_call!(this, xShmLock, ffi::SQLITE_IOERR_SHMLOCK, offset, n, flags);
    if rc == ffi::SQLITE_OK {
        flushed
    } else {
        rc
    }
}

unsafe extern "C" fn shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    // SAFETY: as above.
    let this = unsafe { this(file) };
    let flushed = flush_wal_of(this);
    let rc = inner_call!(this, xShmUnmap, ffi::SQLITE_OK, delete);
    if rc == ffi::SQLITE_OK {
        flushed
    } else {
        rc
    }
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls methods only on files its xOpen opened.
    let this = unsafe { this(file) };
    inner_call!(this, xSectorSize, 4096)
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: as above.
    let this = unsafe { this(file) };
    inner_call!(this, xDeviceCharacteristics, 0)
}

unsafe extern "C" fn shm_barrier(file: *mut ffi::sqlite3_file) {
    // SAFETY: as above.
    let this = unsafe { this(file) };
    inner_call!(this, xShmBarrier, ())
}

unsafe extern "C" fn write(file: *mut ffi::sqlite3_file, buf: *const c_void, amount: c_int, offset: i64) -> c_int {
    // SAFETY: SQLite calls methods only on files its xOpen opened.
    let this = unsafe { this(file) };
    if this.kind == Kind::Main || this.db.is_null() {
        // A WAL not linked to its database would not see the lock release
        // that ends a transaction: it is not buffered.
        return inner_call!(this, xWrite, ffi::SQLITE_IOERR_WRITE, buf, amount, offset);
    }
    let Ok(amount) = usize::try_from(amount) else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    // SAFETY: SQLite passes amount readable bytes at buf.
    let bytes = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), amount) };
    let end = this.run_start + this.run.len() as i64;
    if !this.run.is_empty() && offset >= this.run_start && offset + amount as i64 <= end {
        // Inside the run (SQLite rewriting a frame of the same transaction).
        let at = (offset - this.run_start) as usize;
        this.run[at..at + amount].copy_from_slice(bytes);
        return ffi::SQLITE_OK;
    }
    if !this.run.is_empty() && offset != end {
        let rc = flush(this);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    if this.run.is_empty() {
        this.run_start = offset;
    }
    this.run.extend_from_slice(bytes);
    if this.run.len() >= MAX_RUN {
        return flush(this);
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls methods only on files its xOpen opened.
    let this = unsafe { this(file) };
    let flushed = match this.kind {
        Kind::Wal => flush(this),
        Kind::Main => flush_wal_of(this),
    };
    match this.kind {
        // SAFETY: a linked database is open while its WAL is (SQLite closes the WAL first).
        Kind::Wal if !this.db.is_null() => unsafe { (*this.db).wal = null_mut() },
        // SAFETY: as above, should a WAL still be linked.
        Kind::Main if !this.wal.is_null() => unsafe { (*this.wal).db = null_mut() },
        _ => {}
    }
    let closed = inner_call!(this, xClose, ffi::SQLITE_OK);
    // SAFETY: written in open; SQLite frees the space after xClose and makes no more calls.
    unsafe { ptr::drop_in_place(file.cast::<File>()) };
    if flushed != ffi::SQLITE_OK {
        flushed
    } else {
        closed
    }
}

const fn methods() -> ffi::sqlite3_io_methods {
    ffi::sqlite3_io_methods {
        iVersion: 3,
        xClose: Some(close),
        xRead: Some(read),
        xWrite: Some(write),
        xTruncate: Some(truncate),
        xSync: Some(sync),
        xFileSize: Some(file_size),
        xLock: Some(lock),
        xUnlock: Some(unlock),
        xCheckReservedLock: Some(check_reserved_lock),
        xFileControl: Some(file_control),
        xSectorSize: Some(sector_size),
        xDeviceCharacteristics: Some(device_characteristics),
        xShmMap: Some(shm_map),
        xShmLock: Some(shm_lock),
        xShmBarrier: Some(shm_barrier),
        xShmUnmap: Some(shm_unmap),
        xFetch: Some(fetch),
        xUnfetch: Some(unfetch),
    }
}

/// One table for both kinds (each method looks at `File::kind`); [`open`]
/// tells a file of ours by its pointer.
static METHODS: ffi::sqlite3_io_methods = methods();

unsafe extern "C" fn delete(vfs: *mut ffi::sqlite3_vfs, name: *const c_char, sync_dir: c_int) -> c_int {
    base_call!(vfs, xDelete, ffi::SQLITE_IOERR_DELETE, name, sync_dir)
}

unsafe extern "C" fn access(vfs: *mut ffi::sqlite3_vfs, name: *const c_char, flags: c_int, out: *mut c_int) -> c_int {
    base_call!(vfs, xAccess, ffi::SQLITE_IOERR_ACCESS, name, flags, out)
}

unsafe extern "C" fn full_pathname(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    base_call!(vfs, xFullPathname, ffi::SQLITE_CANTOPEN, name, n, out)
}

unsafe extern "C" fn dl_open(vfs: *mut ffi::sqlite3_vfs, name: *const c_char) -> *mut c_void {
    base_call!(vfs, xDlOpen, null_mut(), name)
}

unsafe extern "C" fn dl_error(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) {
    base_call!(vfs, xDlError, (), n, out)
}

type Symbol = Option<unsafe extern "C" fn(*mut ffi::sqlite3_vfs, *mut c_void, *const c_char)>;

unsafe extern "C" fn dl_sym(vfs: *mut ffi::sqlite3_vfs, handle: *mut c_void, symbol: *const c_char) -> Symbol {
    base_call!(vfs, xDlSym, None, handle, symbol)
}

unsafe extern "C" fn dl_close(vfs: *mut ffi::sqlite3_vfs, handle: *mut c_void) {
    base_call!(vfs, xDlClose, (), handle)
}

unsafe extern "C" fn randomness(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    base_call!(vfs, xRandomness, 0, n, out)
}

unsafe extern "C" fn sleep(vfs: *mut ffi::sqlite3_vfs, micros: c_int) -> c_int {
    base_call!(vfs, xSleep, 0, micros)
}

unsafe extern "C" fn current_time(vfs: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    base_call!(vfs, xCurrentTime, ffi::SQLITE_ERROR, out)
}

unsafe extern "C" fn get_last_error(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    base_call!(vfs, xGetLastError, 0, n, out)
}

unsafe extern "C" fn current_time_int64(vfs: *mut ffi::sqlite3_vfs, out: *mut i64) -> c_int {
    base_call!(vfs, xCurrentTimeInt64, ffi::SQLITE_ERROR, out)
}
