//! Merging an OverlayFS overlay (`rd.live.overlay.overlayfs`) into a new root image.
//!
//! The overlay file is an ext4 file system holding `overlayfs/` (the upper dir) and
//! `ovlwork/`. It is read without mounting, with `debugfs` ([`debugfs`]): `ls -p` walks
//! the tree, `stat` gives times, device numbers, fast symlink targets and xattr names,
//! `ea_get -f` and `dump` copy xattr values and file contents out byte for byte
//! ([`upper`]).
//!
//! The upper dir is then applied onto the root tree with OverlayFS semantics ([`tree`]):
//! files, symlinks and device nodes replace; a whiteout (char device 0:0, or a file with
//! `trusted.overlay.whiteout`) deletes; a directory with `trusted.overlay.opaque=y`
//! replaces the whole lower directory; any other directory is merged and takes the
//! upper's owner, mode and xattrs (copy-up copied them from the lower one).
//! `trusted.overlay.*` attributes are OverlayFS bookkeeping and are not carried over.
//! Overlays using `redirect_dir` or `metacopy` are refused: their files only make
//! sense together with the lower layer they point into.
//!
//! By layout ([`steps`]): a nested `LiveOS/rootfs.img` is changed in place by one
//! `debugfs -w` script; an EROFS tree is extracted on the host (as root) or in a child
//! under `fakeroot` ([`fakeroot`]); a flat squashfs never lands on the host at all: it
//! streams through tar ([`flat`]).
//!
//! What is not carried over: the metadata of the upper root directory itself
//! (dracut creates it; the image's `/` keeps its own), sockets (debugfs cannot make
//! them; they are meaningless in an image anyway), ctime/atime (mtime is kept), and
//! names that are not UTF-8 or contain `"` or a newline (refused by name).
//!
//! The overlay file itself (detection, a fresh one, reset, directory overlays) is the
//! overlay store's, in `persist::ovl_merge`.

pub mod debugfs;
pub mod dir;
pub mod error;
pub mod fakeroot;
pub mod flat;
pub mod steps;
pub mod tree;
pub mod upper;
