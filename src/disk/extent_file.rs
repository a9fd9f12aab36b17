//! A file on a stick reached through its raw extents instead of the FAT driver.
//!
//! An overlay is up to 4 GiB: copying it out to change a 16-byte header or to read
//! a few thousand exceptions would cost minutes on a USB stick. [`ExtentFile`] maps
//! file offsets onto the `(offset, len)` extents the FAT chain gives (in device
//! offsets), so the snapshot functions work on the overlay in place. It never changes
//! the file's length or its cluster chain: growing goes through the FAT driver.

use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::io::SyncData;

/// `Read + Write + Seek` over a list of extents of `inner`.
pub struct ExtentFile<F> {
    inner: F,
    /// (device offset, length, file offset of the extent's first byte)
    extents: Vec<(u64, u64, u64)>,
    len: u64,
    pos: u64,
}

impl<F: Read + Seek> ExtentFile<F> {
    /// `extents` in file order, as `(device offset, length)`.
    pub fn new(inner: F, extents: &[(u64, u64)]) -> ExtentFile<F> {
        let mut at = 0u64;
        let extents = extents
            .iter()
            .filter(|(_, l)| *l > 0)
            .map(|&(o, l)| {
                let e = (o, l, at);
                at += l;
                e
            })
            .collect();
        ExtentFile {
            inner,
            extents,
            len: at,
            pos: 0,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the file is one run of bytes (an external tool can read it by offset).
    pub fn contiguous_offset(&self) -> Option<u64> {
        match self.extents.as_slice() {
            [(o, _, _)] => Some(*o),
            _ => None,
        }
    }

    pub fn into_inner(self) -> F {
        self.inner
    }

    /// The extent holding file offset `pos`: (device offset of `pos`, bytes left in it).
    fn locate(&self, pos: u64) -> Option<(u64, u64)> {
        // Extents are sorted by file offset: binary search the last one starting <= pos.
        let i = self
            .extents
            .partition_point(|e| e.2 <= pos)
            .checked_sub(1)?;
        let (dev, len, start) = self.extents[i];
        let into = pos - start;
        (into < len).then_some((dev + into, len - into))
    }
}

impl<F: Read + Seek> Read for ExtentFile<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let Some((dev, left)) = self.locate(self.pos) else {
            return Ok(0);
        };
        let n = (buf.len() as u64).min(left) as usize;
        self.inner.seek(SeekFrom::Start(dev))?;
        let got = self.inner.read(&mut buf[..n])?;
        if got == 0 {
            // Inside an extent the device has bytes to give: a short device is
            // an error, never a silently shorter file.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stick ends inside a file's extent",
            ));
        }
        self.pos += got as u64;
        Ok(got)
    }
}

impl<F: Read + Write + Seek> Write for ExtentFile<F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // Writing past the end would need new clusters: only the FAT driver may do that.
        let Some((dev, left)) = self.locate(self.pos) else {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "write at {} beyond the end of the file on the stick ({} bytes)",
                    self.pos, self.len
                ),
            ));
        };
        let n = (buf.len() as u64).min(left) as usize;
        self.inner.seek(SeekFrom::Start(dev))?;
        let put = self.inner.write(&buf[..n])?;
        self.pos += put as u64;
        Ok(put)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<F: Read + Seek> Seek for ExtentFile<F> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let target = target
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        self.pos = target;
        Ok(target)
    }
}

impl<F: SyncData> SyncData for ExtentFile<F> {
    fn sync_data(&mut self) -> io::Result<()> {
        self.inner.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn maps_reads_and_writes_across_extents() {
        let mut dev = Cursor::new((0..=255u8).cycle().take(4096).collect::<Vec<u8>>());
        let mut f = ExtentFile::new(&mut dev, &[(100, 10), (1000, 0), (2000, 20)]);
        assert_eq!(f.len(), 30);
        assert_eq!(f.contiguous_offset(), None);
        let mut all = Vec::new();
        f.read_to_end(&mut all).unwrap();
        let want: Vec<u8> = (100..110u32)
            .chain(2000..2020)
            .map(|i| (i % 256) as u8)
            .collect();
        assert_eq!(all, want);
        f.seek(SeekFrom::Start(8)).unwrap();
        f.write_all(&[0xAA; 4]).unwrap();
        f.seek(SeekFrom::Start(30)).unwrap();
        assert!(f.write_all(&[0; 1]).is_err(), "no write past the end");
        let dev = f.into_inner().get_ref().clone();
        assert_eq!(&dev[108..110], &[0xAA, 0xAA]);
        assert_eq!(&dev[2000..2002], &[0xAA, 0xAA]);
        assert_eq!(dev[2002], (2002 % 256) as u8);
    }
}
