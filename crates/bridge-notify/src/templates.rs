//! Messages per event type (the transfer state) and channel. Email and Slack
//! get the long form, SMS the short one (one 160-character segment), email
//! a subject and an HTML part too. Webhooks carry the event itself as JSON.

use bridge_codec::TransferStatusChanged;

/// (state, subject, long text, short text). Placeholders: `{amount}`,
/// `{transfer}`, `{reference}`, `{fund_account}`, `{reason}`.
const TEMPLATES: &[(&str, &str, &str, &str)] = &[
    (
        "requested",
        "Transfer received",
        "We received your transfer of {amount} to {fund_account} (reference {reference}) and are checking it.",
        "Transfer of {amount} received; checking it.",
    ),
    (
        "validated",
        "Transfer accepted",
        "Your transfer of {amount} to {fund_account} passed our checks; the funds are on hold and your allocation is reserved.",
        "Transfer of {amount} accepted; funds on hold.",
    ),
    (
        "withdrawn",
        "Funds withdrawn",
        "{amount} has been withdrawn from your bank account for your transfer to {fund_account}.",
        "{amount} withdrawn from your bank account.",
    ),
    (
        "deposited",
        "Funds deposited",
        "{amount} has been deposited into {fund_account}.",
        "{amount} deposited into the fund.",
    ),
    (
        "completed",
        "Transfer completed",
        "Your transfer of {amount} to {fund_account} is complete. Reference {reference}.",
        "Transfer of {amount} complete.",
    ),
    (
        "rejected",
        "Transfer rejected",
        "Your transfer of {amount} to {fund_account} was rejected ({reason}). No money moved.",
        "Transfer of {amount} rejected ({reason}). No money moved.",
    ),
    (
        "failed",
        "Transfer failed",
        "Your transfer of {amount} to {fund_account} failed ({reason}); the held funds have been released.",
        "Transfer of {amount} failed ({reason}); funds released.",
    ),
    (
        "reversed",
        "Transfer reversed",
        "The fund could not accept your transfer of {amount} ({reason}); the money has been refunded to your bank account.",
        "Transfer of {amount} reversed ({reason}); refunded.",
    ),
    (
        "manual_review",
        "Transfer under review",
        "Your transfer of {amount} to {fund_account} needs a review by our team ({reason}). We will contact you.",
        "Transfer of {amount} under review ({reason}).",
    ),
];

/// What the investor can do about a reason, added to the message: (reason
/// code, long text, short text).
const HINTS: &[(&str, &str, &str)] = &[
    (
        "BANK_ACCESS_EXPIRED",
        " Your bank no longer accepts our access to your account: please reconnect your bank account, then try again.",
        " Reconnect your bank.",
    ),
    (
        "BANK_ACCESS_INVALID",
        " Your bank did not recognise our access to your account: please reconnect your bank account, then try again.",
        " Reconnect your bank.",
    ),
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    /// Email and Slack.
    pub text: String,
    /// Email's HTML part: the text, escaped, in a minimal document.
    pub html: String,
    /// SMS.
    pub short: String,
}

/// Minor units in major units, by the currency's exponent (ISO 4217).
pub fn format_amount(amount_minor: i64, currency: &str) -> String {
    let exponent = match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX" | "VND" | "VUV"
        | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        _ => 2,
    };
    let sign = if amount_minor < 0 { "-" } else { "" };
    let units = amount_minor.unsigned_abs();
    if exponent == 0 {
        return format!("{sign}{units} {currency}");
    }
    let scale = 10u64.pow(exponent);
    format!("{sign}{}.{:0width$} {currency}", units / scale, units % scale, width = exponent as usize)
}

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

pub fn render(event: &TransferStatusChanged) -> Rendered {
    let (subject, long, short) = TEMPLATES
        .iter()
        .find(|(state, ..)| *state == event.state)
        .map(|(_, subject, long, short)| (*subject, *long, *short))
        .unwrap_or(("Transfer update", "Your transfer of {amount} is now {state}.", "Transfer of {amount}: {state}."));
    let amount = format_amount(event.amount_minor, &event.currency);
    // A reference from Kafka was not checked at an API: what could make a
    // message read as something else (a bidi override) is left out.
    let reference = bridge_domain::text::visible(&event.reference);
    let reference = if reference.is_empty() { event.transfer_id.as_str() } else { reference.as_str() };
    let fill = |template: &str| {
        template
            .replace("{amount}", &amount)
            .replace("{transfer}", &event.transfer_id)
            .replace("{reference}", reference)
            .replace("{fund_account}", &event.fund_account_id)
            .replace("{reason}", event.reason_code.as_deref().unwrap_or("no reason given"))
            .replace("{state}", &event.state)
    };
    let hint = HINTS.iter().find(|(reason, ..)| event.reason_code.as_deref() == Some(*reason));
    let mut text = fill(long);
    let mut short = fill(short);
    if let Some((_, long_hint, short_hint)) = hint {
        text.push_str(long_hint);
        short.push_str(short_hint);
    }
    let html = format!(
        "<!doctype html><html><body><h1>{}</h1><p>{}</p><p><small>Transfer {}</small></p></body></html>",
        escape_html(subject),
        escape_html(&text),
        escape_html(&event.transfer_id)
    );
    if short.chars().count() > 160 {
        short = short.chars().take(157).collect::<String>() + "...";
    }
    Rendered { subject: subject.to_owned(), text, html, short }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(state: &str, reason: Option<&str>) -> TransferStatusChanged {
        TransferStatusChanged {
            event_id: "e".into(),
            transfer_id: "t-<1>".into(),
            version: 1,
            state: state.into(),
            previous_state: None,
            terminal: false,
            reason_code: reason.map(Into::into),
            investor_account_id: "inv".into(),
            fund_account_id: "fund-<a>".into(),
            amount_minor: 1_234_56,
            currency: "EUR".into(),
            reference: String::new(),
            occurred_at: 0,
        }
    }

    #[test]
    fn amounts_use_the_currency_exponent() {
        assert_eq!(format_amount(1_234_56, "EUR"), "1234.56 EUR");
        assert_eq!(format_amount(5, "USD"), "0.05 USD");
        assert_eq!(format_amount(1_234, "JPY"), "1234 JPY");
        assert_eq!(format_amount(1_234, "KWD"), "1.234 KWD");
        assert_eq!(format_amount(-150, "EUR"), "-1.50 EUR");
    }

    #[test]
    fn every_state_has_its_own_template_and_html_is_escaped() {
        for state in bridge_domain::TransferState::ALL {
            let rendered = render(&event(state.as_str(), Some("CODE")));
            assert_ne!(rendered.subject, "Transfer update", "{state} has no template");
            assert!(rendered.text.contains("1234.56 EUR"), "{}", rendered.text);
            assert!(rendered.short.chars().count() <= 160);
            assert!(!rendered.html.contains("<1>") && rendered.html.contains("t-&lt;1&gt;"), "{}", rendered.html);
        }
        assert!(render(&event("failed", Some("ACCOUNT_FROZEN"))).short.contains("ACCOUNT_FROZEN"));
    }

    #[test]
    fn an_investor_whose_bank_access_lapsed_is_asked_to_reconnect() {
        for reason in ["BANK_ACCESS_EXPIRED", "BANK_ACCESS_INVALID"] {
            let rendered = render(&event("failed", Some(reason)));
            assert!(rendered.text.contains("reconnect your bank account"), "{}", rendered.text);
            assert!(rendered.short.ends_with("Reconnect your bank.") && rendered.short.chars().count() <= 160);
        }
        assert!(!render(&event("failed", Some("ACCOUNT_FROZEN"))).text.contains("reconnect"));
    }
}
