//! GPT-2 byte-level alphabet: the reversible map between raw bytes and the printable
//! characters that byte-level BPE vocabularies are written in (`Ġ` = space, `Ċ` = newline).
//!
//! Owns only the char → byte direction, used to turn a vocabulary entry back into the raw
//! bytes it stands for. Encoding (bytes → chars) is done by the `tokenizers` crate.
//!
//! ```text
//!   byte 0x21..=0x7E, 0xA1..=0xAC, 0xAE..=0xFF  ──►  the char with the same code point
//!   the other 68 bytes, in increasing order      ──►  U+0100, U+0101, ... U+0143
//! ```

/// Number of bytes that are not printable in the GPT-2 alphabet and are shifted to U+0100...
const NUM_SHIFTED_BYTES: usize = 68;

/// Whether `b` is one of the bytes that GPT-2's `bytes_to_unicode` keeps as itself.
const fn is_printable_byte(b: u8) -> bool {
    matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The non-printable bytes in increasing order; `SHIFTED[n]` is written as `U+0100 + n`.
const SHIFTED: [u8; NUM_SHIFTED_BYTES] = {
    let mut out = [0u8; NUM_SHIFTED_BYTES];
    let mut n = 0;
    let mut b = 0usize;
    while b < 256 {
        if !is_printable_byte(b as u8) {
            out[n] = b as u8; // n < 68: exactly 68 bytes are not printable (asserted below)
            n += 1;
        }
        b += 1;
    }
    assert!(n == NUM_SHIFTED_BYTES);
    out
};

/// The byte that `c` stands for in the GPT-2 alphabet, or `None` if `c` is not in it.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let code = c as u32;
    if code < 256 {
        let b = code as u8;
        return is_printable_byte(b).then_some(b);
    }
    let shifted_index = usize::try_from(code - 256).ok()?;
    SHIFTED.get(shifted_index).copied()
}

/// The char that byte `b` is written as in the GPT-2 alphabet (test helper).
#[cfg(test)]
pub(crate) fn byte_to_char(b: u8) -> char {
    if is_printable_byte(b) {
        return char::from(b);
    }
    let shifted_index = SHIFTED.iter().position(|&s| s == b).unwrap_or(0);
    // 256 + index < 256 + 68 is always a valid scalar value.
    char::from_u32(256 + shifted_index as u32).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// Byte-level spelling of `text` (each UTF-8 byte as its alphabet char; test helper).
#[cfg(test)]
pub(crate) fn spell(text: &str) -> String {
    text.bytes().map(byte_to_char).collect()
}

/// The raw bytes a vocabulary entry decodes to, with the same rule as the `tokenizers`
/// crate's `ByteLevel` decoder: if every char is in the alphabet, map each char to its byte;
/// otherwise (e.g. a special token containing a space) take the entry's UTF-8 bytes verbatim.
pub(crate) fn piece_bytes(token: &str) -> Vec<u8> {
    token
        .chars()
        .map(char_to_byte)
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_else(|| token.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Python's `bytes_to_unicode`, written out the slow way.
    fn reference_byte_to_char() -> Vec<char> {
        let mut out = vec!['\0'; 256];
        let mut n = 0u32;
        for b in 0..=255u8 {
            out[b as usize] = if is_printable_byte(b) {
                char::from(b)
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            };
        }
        out
    }

    #[test]
    fn alphabet_round_trips_every_byte() {
        let table = reference_byte_to_char();
        for (b, &c) in table.iter().enumerate() {
            assert_eq!(char_to_byte(c), Some(b as u8), "byte {b:#x} char {c:?}");
            assert_eq!(byte_to_char(b as u8), c, "byte {b:#x}");
        }
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn chars_outside_alphabet_are_rejected() {
        assert_eq!(char_to_byte(' '), None);
        assert_eq!(char_to_byte('\u{AD}'), None);
        assert_eq!(char_to_byte('\u{144}'), None);
        assert_eq!(char_to_byte('日'), None);
    }

    #[test]
    fn piece_bytes_falls_back_to_utf8() {
        assert_eq!(piece_bytes("Ġhello"), b" hello");
        assert_eq!(piece_bytes("<|im_start|>"), b"<|im_start|>");
        assert_eq!(piece_bytes("a b"), b"a b");
        // "æĹ¥" is the byte-level spelling of the three UTF-8 bytes of '日'.
        assert_eq!(piece_bytes("æĹ¥"), "日".as_bytes());
    }
}
