//! Free text (a transfer's reference, an operator's reason) travels into
//! logs, SMS, emails and operators' screens. Control characters and
//! Unicode's format characters (general category Cf: the bidirectional
//! overrides such as U+202E, zero-width joiners and spaces, the soft
//! hyphen) can make it read as something it is not, so text that carries
//! them is refused where it enters, and left out where it is shown.

use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

fn hidden(c: char) -> bool {
    c.is_control() || c.general_category() == GeneralCategory::Format
}

/// Whether `text` is free of control and format characters.
pub fn is_visible(text: &str) -> bool {
    !text.chars().any(hidden)
}

/// `text` without its control and format characters.
pub fn visible(text: &str) -> String {
    text.chars().filter(|c| !hidden(*c)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bidi_overrides_and_invisible_characters_are_caught() {
        assert!(is_visible("Invoice 42 — café, 東京"));
        for sneaky in
            ["pay\u{202E}gnp.exe", "a\u{200B}b", "x\u{2066}y\u{2069}", "soft\u{00AD}hyphen", "bom\u{FEFF}", "tab\t"]
        {
            assert!(!is_visible(sneaky), "{sneaky:?}");
        }
        assert_eq!(visible("pay\u{202E}gnp"), "paygnp");
    }
}
