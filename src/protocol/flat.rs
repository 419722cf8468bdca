//! The request reader's fast path: a map whose keys are strings and whose
//! values are all scalars (what every data-path request is) read straight
//! from the bytes into the same fields serde would give
//! [`super::decode`]. Anything else (a nested value, a key that is not a
//! string or comes twice, bad UTF-8, trailing bytes, a truncated frame)
//! returns `None`, and the general reader decides, with its errors: this
//! path never decides what is wrong, so it cannot word an error
//! differently.

use bytes::Bytes;

use super::loose::{Field, NAMES, string};

/// The position of `op` in [`NAMES`].
const OP: usize = 1;

/// Reads the fields into `fields` (empty), by position in [`NAMES`]:
/// false if the general reader must decide (see the module), which
/// ignores what was read. Filled in place: the array is ~700 bytes, and
/// returning it cost a `memcpy` per request.
pub(super) fn fields(frame: &[u8], fields: &mut [Option<Field>; NAMES.len()]) -> bool {
    read(frame, fields).is_some()
}

fn read(frame: &[u8], fields: &mut [Option<Field>; NAMES.len()]) -> Option<()> {
    let mut r = Reader { b: frame, at: 0 };
    let n = match r.byte()? {
        m @ 0x80..=0x8f => (m & 0x0f) as usize,
        0xde => r.be(2)? as usize,
        _ => return None,
    };
    for _ in 0..n {
        let name = r.key()?;
        let i = NAMES.iter().position(|k| k.as_bytes() == name);
        // Only an op name is worth borrowing (`loose::string`): it comes
        // with every request; a tenant or key is the caller's own.
        let value = r.scalar(i == Some(OP))?;
        // Unknown names are skipped, as newer clients may send them.
        if let Some(i) = i
            && fields[i].replace(value).is_some()
        {
            return None;
        }
    }
    (r.at == frame.len()).then_some(())
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    fn byte(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    /// An `n`-byte big-endian unsigned integer.
    fn be(&mut self, n: usize) -> Option<u64> {
        Some(
            self.take(n)?
                .iter()
                .fold(0, |v, &x| (v << 8) | u64::from(x)),
        )
    }

    /// An `n`-byte big-endian signed integer, as the loose reader keeps
    /// it: `Uint` when it is not negative.
    fn int(&mut self, n: usize) -> Option<Field> {
        let shift = 64 - 8 * n as u32;
        let v = ((self.be(n)? << shift) as i64) >> shift;
        Some(u64::try_from(v).map_or(Field::Int(v), Field::Uint))
    }

    fn str(&mut self, n: usize, intern: bool) -> Option<Field> {
        let s = utf8(self.take(n)?)?;
        Some(if intern {
            string(s)
        } else {
            Field::Str(s.to_owned().into())
        })
    }

    /// A map key: a string's bytes (checked as UTF-8 when it is a value).
    fn key(&mut self) -> Option<&'a [u8]> {
        let n = match self.byte()? {
            m @ 0xa0..=0xbf => (m & 0x1f) as usize,
            0xd9 => self.be(1)? as usize,
            _ => return None,
        };
        let k = self.take(n)?;
        utf8(k)?;
        Some(k)
    }

    fn bin(&mut self, n: usize) -> Option<Field> {
        Some(Field::Bin(Bytes::copy_from_slice(self.take(n)?)))
    }

    /// One scalar value; `None` for anything nested, an extension type or
    /// a reserved marker. `intern`: a string may be a borrowed op name.
    fn scalar(&mut self, intern: bool) -> Option<Field> {
        let m = self.byte()?;
        Some(match m {
            0x00..=0x7f => Field::Uint(u64::from(m)),
            0xe0..=0xff => Field::Int(i64::from(m as i8)),
            0xa0..=0xbf => return self.str((m & 0x1f) as usize, intern),
            0xc0 => Field::Nil,
            0xc2 => Field::Bool(false),
            0xc3 => Field::Bool(true),
            0xc4..=0xc6 => {
                let n = self.be(1 << (m - 0xc4))?;
                return self.bin(usize::try_from(n).ok()?);
            }
            0xca => Field::Float(f64::from(f32::from_bits(self.be(4)? as u32))),
            0xcb => Field::Float(f64::from_bits(self.be(8)?)),
            0xcc..=0xcf => Field::Uint(self.be(1 << (m - 0xcc))?),
            0xd0..=0xd3 => return self.int(1 << (m - 0xd0)),
            0xd9..=0xdb => {
                let n = self.be(1 << (m - 0xd9))?;
                return self.str(usize::try_from(n).ok()?, intern);
            }
            _ => return None,
        })
    }
}

/// `bytes` as UTF-8, if it is. Names, ops, tenants and keys are nearly
/// always ASCII, and `is_ascii` is a few instructions where `from_utf8`
/// is a call of ~60 for a short string (5 strings a request).
fn utf8(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is valid UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        std::str::from_utf8(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn op_is_where_names_say() {
        assert_eq!(super::NAMES[super::OP], "op");
    }
}
