//! diffusers' caption cleaning for PixArt (`_clean_caption`, from DeepFloyd IF) and its
//! `_text_preprocessing`: URL-unquoting, lower-casing, removal of URLs, HTML tags, @names,
//! CJK characters, file names, ids and shop boilerplate, quote and dash normalization and
//! punctuation clean-up, with the same regular expressions.
//!
//! diffusers also calls BeautifulSoup (`html.parser`) and `ftfy.fix_text`; here we do what they
//! do for captions: tags, comments and declarations are removed and character references
//! decoded (a table of the common named entities plus numeric ones); ftfy's part covers
//! full-width characters, ligatures, curly quotes, line breaks and control characters. Not
//! covered: ftfy's mojibake repair (text decoded with the wrong codec), Unicode NFC
//! normalization, and HTML entities outside the table.

use std::sync::OnceLock;

use regex::Regex;

/// diffusers' `_text_preprocessing` for one prompt: with `clean`, [`clean_caption`] applied
/// twice (as diffusers does); without, lower-cased and trimmed.
pub fn preprocess_caption(text: &str, clean: bool) -> String {
    if clean {
        clean_caption(&clean_caption(text))
    } else {
        text.to_lowercase().trim().to_string()
    }
}

/// The compiled patterns, in the order diffusers applies them.
struct Patterns {
    url_http: Regex,
    url_www: Regex,
    nickname: Regex,
    cjk: Regex,
    dashes: Regex,
    double_quotes: Regex,
    single_quotes: Regex,
    quot: Regex,
    amp: Regex,
    ip: Regex,
    article_id: Regex,
    escaped_newline: Regex,
    hash_short: Regex,
    hash_long: Regex,
    long_number: Regex,
    filename: Regex,
    quote_runs: Regex,
    dot_runs: Regex,
    bad_punct: Regex,
    lone_dot: Regex,
    dash_underscore: Regex,
    id_a: Regex,
    id_b: Regex,
    id_c: Regex,
    shipping: Regex,
    download: Regex,
    click: Regex,
    image_ext: Regex,
    page: Regex,
    mixed_id: Regex,
    dimensions: Regex,
    colon: Regex,
    punct_space: Regex,
    spaces: Regex,
    quoted: Regex,
    leading_punct: Regex,
    trailing_punct: Regex,
    dot_word: Regex,
}

fn re(pattern: &str) -> Regex {
    // The patterns are constants of this module; a failure is a bug caught by the tests.
    Regex::new(pattern).unwrap_or_else(|e| panic!("caption pattern {pattern:?}: {e}"))
}

fn patterns() -> &'static Patterns {
    static P: OnceLock<Patterns> = OnceLock::new();
    P.get_or_init(|| Patterns {
        url_http: re(r"\b((?:https?:(?:/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b/?))"),
        url_www: re(r"\b((?:www:(?:/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b/?))"),
        nickname: re(r"@[\w\d]+\b"),
        cjk: re(r"[\u{31c0}-\u{31ef}\u{31f0}-\u{31ff}\u{3200}-\u{32ff}\u{3300}-\u{33ff}\u{3400}-\u{4dbf}\u{4dc0}-\u{4dff}\u{4e00}-\u{9fff}]+"),
        dashes: re(r"[\u{002D}\u{058A}\u{05BE}\u{1400}\u{1806}\u{2010}-\u{2015}\u{2E17}\u{2E1A}\u{2E3A}\u{2E3B}\u{2E40}\u{301C}\u{3030}\u{30A0}\u{FE31}\u{FE32}\u{FE58}\u{FE63}\u{FF0D}]+"),
        double_quotes: re("[`´«»“”¨]"),
        single_quotes: re("[‘’]"),
        quot: re("&quot;?"),
        amp: re("&amp"),
        ip: re(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"),
        article_id: re(r"\d:\d\d\s+\n?\z"),
        escaped_newline: re(r"\\n"),
        hash_short: re(r"#\d{1,3}\b"),
        hash_long: re(r"#\d{5,}\b"),
        long_number: re(r"\b\d{6,}\b"),
        filename: re(r"\S+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"),
        quote_runs: re(r#"["']{2,}"#),
        dot_runs: re(r"\.{2,}"),
        bad_punct: re(r"[#®•©™&@·º½¾¿¡§~)(\]\[}{|\\/*]+"),
        lone_dot: re(r"\s+\.\s+"),
        dash_underscore: re(r"[-_]"),
        id_a: re(r"\b[a-zA-Z]{1,3}\d{3,15}\b"),
        id_b: re(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b"),
        id_c: re(r"\b\d+[a-zA-Z]+\d+\b"),
        shipping: re(r"(worldwide\s+)?(free\s+)?shipping"),
        download: re(r"(free\s)?download(\sfree)?"),
        click: re(r"\bclick\b\s(?:for|on)\s\w+"),
        image_ext: re(r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?"),
        page: re(r"\bpage\s+\d+\b"),
        mixed_id: re(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b"),
        dimensions: re(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b"),
        colon: re(r"\b\s+:\s+"),
        punct_space: re(r"(\D[,./])\b"),
        spaces: re(r"\s+"),
        quoted: re(r#"\A["']([\w\W]+)["']\n?\z"#),
        leading_punct: re(r"\A['_,\-:;]"),
        trailing_punct: re(r"['_,\-:+]\n?\z"),
        dot_word: re(r"\A\.\S+\n?\z"),
    })
}

/// Python's `urllib.parse.unquote_plus`: `+` to space, `%XX` to bytes, decoded as UTF-8 with
/// replacement characters.
fn unquote_plus(text: &str) -> String {
    let bytes = text.replace('+', " ").into_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Named character references decoded here (with and without `;` where HTML allows both).
const ENTITIES: &[(&str, &str, bool)] = &[
    ("amp", "&", true),
    ("lt", "<", true),
    ("gt", ">", true),
    ("quot", "\"", true),
    ("nbsp", "\u{a0}", true),
    ("copy", "©", true),
    ("reg", "®", true),
    ("apos", "'", false),
    ("trade", "™", false),
    ("hellip", "…", false),
    ("mdash", "—", false),
    ("ndash", "–", false),
    ("laquo", "«", true),
    ("raquo", "»", true),
    ("lsquo", "‘", false),
    ("rsquo", "’", false),
    ("ldquo", "“", false),
    ("rdquo", "”", false),
    ("deg", "°", true),
    ("times", "×", true),
];

/// Python's `html.unescape` for numeric references and the [`ENTITIES`] table.
fn unescape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 1..];
        if let Some(num) = tail.strip_prefix('#') {
            let (radix, digits) = match num.strip_prefix(['x', 'X']) {
                Some(h) => (16, h),
                None => (10, num),
            };
            let len = digits.chars().take_while(|c| c.is_digit(radix)).count();
            if len > 0 {
                let value = u32::from_str_radix(&digits[..len], radix).ok();
                let ch = value
                    .and_then(char::from_u32)
                    .filter(|c| *c != '\0')
                    .unwrap_or('\u{fffd}');
                out.push(ch);
                let consumed = 1 + (num.len() - digits.len()) + len;
                let consumed = consumed + usize::from(tail[consumed..].starts_with(';'));
                rest = &tail[consumed..];
                continue;
            }
        }
        let named = ENTITIES.iter().find_map(|(name, value, bare)| {
            if tail.starts_with(&format!("{name};")) {
                Some((name.len() + 1, *value))
            } else if *bare && tail.starts_with(name) {
                Some((name.len(), *value))
            } else {
                None
            }
        });
        match named {
            Some((len, value)) => {
                out.push_str(value);
                rest = &tail[len..];
            }
            None => {
                out.push('&');
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// BeautifulSoup(`html.parser`)`.text`: drops tags, comments, declarations and processing
/// instructions, and decodes character references in the text.
fn html_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('<') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let mut chars = tail[1..].chars();
        let next = chars.next();
        let after = chars.next();
        let end = if tail.starts_with("<!--") {
            tail.find("-->").map(|e| e + 3)
        } else if matches!(next, Some(c) if c.is_ascii_alphabetic())
            || (next == Some('/') && matches!(after, Some(c) if c.is_ascii_alphabetic()))
            || matches!(next, Some('!' | '?'))
        {
            tail.find('>').map(|e| e + 1)
        } else {
            None
        };
        match end {
            Some(e) => rest = &tail[e..],
            None if matches!(next, Some(c) if c.is_ascii_alphabetic() || c == '/' || c == '!' || c == '?') =>
            {
                // An unterminated tag runs to the end of the text.
                rest = "";
            }
            None => {
                out.push('<');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    unescape_html(&out)
}

/// The part of `ftfy.fix_text` captions need: full-width ASCII to ASCII, ligatures split,
/// curly quotes straightened, line breaks unified, control characters removed.
fn fix_text(text: &str) -> String {
    let text = text.replace("\r\n", "\n");
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{ff01}'..='\u{ff5e}' => out.push(char::from_u32(c as u32 - 0xfee0).unwrap_or(c)),
            '\u{3000}' => out.push(' '),
            'ﬀ' => out.push_str("ff"),
            'ﬁ' => out.push_str("fi"),
            'ﬂ' => out.push_str("fl"),
            'ﬃ' => out.push_str("ffi"),
            'ﬄ' => out.push_str("ffl"),
            'ﬅ' | 'ﬆ' => out.push_str("st"),
            '‘' | '’' | '‚' | '‛' => out.push('\''),
            '“' | '”' | '„' | '‟' => out.push('"'),
            '\r' | '\u{2028}' | '\u{2029}' | '\u{85}' => out.push('\n'),
            '\u{0}'..='\u{8}' | '\u{b}' | '\u{e}'..='\u{1f}' | '\u{7f}' | '\u{80}'..='\u{9f}' => {}
            _ => out.push(c),
        }
    }
    out
}

/// Removes the matches of a URL pattern except those followed by `@` (the pattern's `(?!@)`
/// lookahead, which the `regex` crate lacks): such a match is skipped and the scan resumes one
/// character later.
fn remove_urls(re: &Regex, text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut pos = 0;
    while pos <= text.len() {
        let Some(m) = re.find_at(text, pos) else {
            break;
        };
        let lookahead_applies = !m.as_str().starts_with("http") && !m.as_str().starts_with("www:");
        if lookahead_applies && text[m.end()..].starts_with('@') {
            pos = m.start() + text[m.start()..].chars().next().map_or(1, char::len_utf8);
            continue;
        }
        out.push_str(&text[copied..m.start()]);
        copied = m.end();
        pos = if m.end() > m.start() {
            m.end()
        } else {
            m.end() + 1
        };
    }
    out.push_str(&text[copied.min(text.len())..]);
    out
}

/// One pass of diffusers' `_clean_caption`.
pub fn clean_caption(caption: &str) -> String {
    let p = patterns();
    let mut c = unquote_plus(caption);
    c = c.trim().to_lowercase();
    c = c.replace("<person>", "person");
    c = remove_urls(&p.url_http, &c);
    c = remove_urls(&p.url_www, &c);
    c = html_text(&c);
    let sub = |re: &Regex, text: &str, with: &str| re.replace_all(text, with).into_owned();
    c = sub(&p.nickname, &c, "");
    c = sub(&p.cjk, &c, "");
    c = sub(&p.dashes, &c, "-");
    c = sub(&p.double_quotes, &c, "\"");
    c = sub(&p.single_quotes, &c, "'");
    c = sub(&p.quot, &c, "");
    c = sub(&p.amp, &c, "");
    c = sub(&p.ip, &c, " ");
    c = sub(&p.article_id, &c, "");
    c = sub(&p.escaped_newline, &c, " ");
    c = sub(&p.hash_short, &c, "");
    c = sub(&p.hash_long, &c, "");
    c = sub(&p.long_number, &c, "");
    c = sub(&p.filename, &c, "");
    c = sub(&p.quote_runs, &c, "\"");
    c = sub(&p.dot_runs, &c, " ");
    c = sub(&p.bad_punct, &c, " ");
    c = sub(&p.lone_dot, &c, " ");
    if p.dash_underscore.find_iter(&c).count() > 3 {
        c = sub(&p.dash_underscore, &c, " ");
    }
    c = fix_text(&c);
    c = unescape_html(&unescape_html(&c));
    c = sub(&p.id_a, &c, "");
    c = sub(&p.id_b, &c, "");
    c = sub(&p.id_c, &c, "");
    c = sub(&p.shipping, &c, "");
    c = sub(&p.download, &c, "");
    c = sub(&p.click, &c, "");
    c = sub(&p.image_ext, &c, "");
    c = sub(&p.page, &c, "");
    c = sub(&p.mixed_id, &c, " ");
    c = sub(&p.dimensions, &c, "");
    c = sub(&p.colon, &c, ": ");
    c = sub(&p.punct_space, &c, "${1} ");
    c = sub(&p.spaces, &c, " ");
    c = sub(&p.quoted, &c, "${1}");
    c = sub(&p.leading_punct, &c, "");
    c = sub(&p.trailing_punct, &c, "");
    c = sub(&p.dot_word, &c, "");
    c.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_patterns_compile() {
        let _ = patterns();
    }

    #[test]
    fn unquote_plus_decodes_percent_escapes_and_plus() {
        assert_eq!(unquote_plus("a%20b+c%zz%"), "a b c%zz%");
    }

    #[test]
    fn html_text_drops_tags_and_decodes_entities() {
        assert_eq!(
            html_text("<b>x</b> &lt;y&gt; a < b <!-- c -->"),
            "x <y> a < b "
        );
    }
}
