//! Money as integer minor units plus an ISO-4217 currency. There is no float
//! anywhere in this type, by construction.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// An ISO-4217 alphabetic currency code. Stored inline as three ASCII bytes so
/// it is `Copy` and can never hold anything but three upper-case letters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

impl Currency {
    /// An ISO 4217 alphabetic code (the `iso_currency` crate's table, so
    /// a code no one issues, `ABC`, is refused like a malformed one).
    pub fn parse(code: &str) -> Result<Self> {
        let bytes = code.as_bytes();
        if bytes.len() == 3
            && bytes.iter().all(u8::is_ascii_uppercase)
            && iso_currency::Currency::from_code(code).is_some()
        {
            Ok(Self([bytes[0], bytes[1], bytes[2]]))
        } else {
            Err(Error::InvalidCurrency(code.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        // The constructor admits only ASCII upper-case letters.
        std::str::from_utf8(&self.0).expect("currency code is ASCII")
    }
}

impl TryFrom<String> for Currency {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        Self::parse(&value)
    }
}

impl From<Currency> for String {
    fn from(value: Currency) -> Self {
        value.as_str().to_owned()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Currency({})", self.as_str())
    }
}

/// An amount of money: signed minor units (cents for EUR) and a currency.
/// Arithmetic is checked and refuses to mix currencies.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Money {
    pub amount_minor: i64,
    pub currency: Currency,
}

impl Money {
    pub fn new(amount_minor: i64, currency: Currency) -> Self {
        Self { amount_minor, currency }
    }

    pub fn checked_add(self, other: Money) -> Result<Money> {
        self.same_currency(other)?;
        let amount_minor = self
            .amount_minor
            .checked_add(other.amount_minor)
            .ok_or(Error::Overflow { left: self.amount_minor, right: other.amount_minor })?;
        Ok(Money { amount_minor, currency: self.currency })
    }

    pub fn checked_sub(self, other: Money) -> Result<Money> {
        self.checked_add(Money { amount_minor: -other.amount_minor, currency: other.currency })
    }

    fn same_currency(self, other: Money) -> Result<()> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(Error::CurrencyMismatch { left: self.currency, right: other.currency })
        }
    }
}

/// `amount_minor` of `currency` in major units for people to read, grouped
/// by thousands: `123456` EUR is `1,234.56 EUR`, `1234` JPY is `1,234 JPY`
/// (the currency's exponent from ISO 4217; 2 for a code it does not know).
/// Integer arithmetic only.
pub fn format_major(amount_minor: i64, currency: &str) -> String {
    let exponent = iso_currency::Currency::from_code(currency).and_then(|code| code.exponent()).unwrap_or(2) as u32;
    let scale = 10u128.pow(exponent);
    let magnitude = u128::from(amount_minor.unsigned_abs());
    let (major, minor) = (magnitude / scale, magnitude % scale);
    let digits = major.to_string();
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    let sign = if amount_minor < 0 { "-" } else { "" };
    if exponent == 0 {
        format!("{sign}{grouped} {currency}")
    } else {
        format!("{sign}{grouped}.{minor:0width$} {currency}", width = exponent as usize)
    }
}

impl fmt::Display for Money {
    /// Shows minor units exactly; formatting into major units depends on the
    /// currency's exponent and belongs to presentation layers.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} (minor units)", self.amount_minor, self.currency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_read_in_major_units_by_the_currency_exponent() {
        assert_eq!(format_major(123_456, "EUR"), "1,234.56 EUR");
        assert_eq!(format_major(-5, "EUR"), "-0.05 EUR");
        assert_eq!(format_major(1_234, "JPY"), "1,234 JPY");
        assert_eq!(format_major(1_234_567, "KWD"), "1,234.567 KWD");
        assert_eq!(format_major(i64::MIN, "EUR"), "-92,233,720,368,547,758.08 EUR");
        assert_eq!(format_major(100, "???"), "1.00 ???");
    }

    #[test]
    fn currency_accepts_only_iso_4217_codes() {
        for good in ["EUR", "USD", "GBP", "JPY", "CHF"] {
            assert!(Currency::parse(good).is_ok(), "{good}");
        }
        for bad in ["eur", "EU", "EURO", "E1R", "", "ÉUR", "ABC", "QQQ"] {
            assert!(Currency::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn money_refuses_mixed_currencies_and_overflow() {
        let eur = Currency::parse("EUR").unwrap();
        let usd = Currency::parse("USD").unwrap();
        assert_eq!(Money::new(5, eur).checked_add(Money::new(7, eur)).unwrap(), Money::new(12, eur));
        assert!(Money::new(5, eur).checked_add(Money::new(7, usd)).is_err());
        assert!(Money::new(i64::MAX, eur).checked_add(Money::new(1, eur)).is_err());
    }
}
