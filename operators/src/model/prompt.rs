//! Prompts as ComfyUI reads them: emphasis weights in parentheses and prompts longer than one
//! 77-token window.
//!
//! - `(text)` multiplies the weight of `text` by 1.1 (nesting multiplies again);
//!   `(text:1.3)` sets it to 1.3; `\(` and `\)` are literal parentheses.
//! - Words are tokenized one by one and packed into windows of 75 tokens between the start
//!   and end tokens; a word that does not fit moves to the next window whole, unless it is 8
//!   tokens or longer (then it is cut). Each window is encoded on its own and the windows'
//!   states are concatenated along the token axis (`[1, 77 * windows, dim]`).
//! - Where any weight is not 1, the empty prompt is encoded too and each weighted token's
//!   state becomes `empty + weight * (state - empty)`, position by position.

use super::clip::{ClipTokenizer, BOS, CONTEXT, EOS};
use candle_core::Tensor;
use nova_dataflow::NodeError;

/// A word at least this many tokens long may be cut across windows.
const LONG_WORD: usize = 8;

/// Pieces of `text` with their weights, parentheses resolved.
pub fn parse_weights(text: &str) -> Vec<(String, f32)> {
    // Escaped parentheses become private-use characters while parsing.
    let (open, close) = ('\u{E000}', '\u{E001}');
    let escaped = text
        .replace("\\(", &open.to_string())
        .replace("\\)", &close.to_string());
    let mut out = Vec::new();
    weigh(&escaped, 1.0, &mut out);
    out.into_iter()
        .map(|(s, w)| (s.replace(open, "(").replace(close, ")"), w))
        .filter(|(s, _)| !s.is_empty())
        .collect()
}

/// Splits `s` into top-level groups: plain text and `( ... )` groups (an unclosed group runs
/// to the end and stays plain).
fn groups(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut depth = 0usize;
    for ch in s.chars() {
        match ch {
            '(' => {
                if depth == 0 && !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                cur.push(ch);
                depth += 1;
            }
            ')' if depth > 0 => {
                cur.push(ch);
                depth -= 1;
                if depth == 0 {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(ch),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn weigh(s: &str, weight: f32, out: &mut Vec<(String, f32)>) {
    for g in groups(s) {
        let inner = g
            .strip_prefix('(')
            .and_then(|x| x.strip_suffix(')'))
            .filter(|_| g.len() >= 2);
        match inner {
            Some(inner) => {
                let (text, w) = match inner.rfind(':') {
                    Some(i) if i > 0 => match inner[i + 1..].trim().parse::<f32>() {
                        Ok(w) => (&inner[..i], w),
                        Err(_) => (inner, weight * 1.1),
                    },
                    _ => (inner, weight * 1.1),
                };
                weigh(text, w, out);
            }
            None => out.push((g, weight)),
        }
    }
}

/// The prompt's windows: each 77 ids (`[start, up to 75 tokens, end, end...]`) with a weight
/// per position (1 for start, end and padding).
pub fn windows(tok: &ClipTokenizer, text: &str) -> Vec<(Vec<u32>, Vec<f32>)> {
    let mut done = Vec::new();
    let mut ids = vec![BOS];
    let mut weights = vec![1.0f32];
    let close = |ids: &mut Vec<u32>, weights: &mut Vec<f32>, done: &mut Vec<_>| {
        ids.push(EOS);
        weights.push(1.0);
        ids.resize(CONTEXT, EOS);
        weights.resize(CONTEXT, 1.0);
        done.push((
            std::mem::replace(ids, vec![BOS]),
            std::mem::replace(weights, vec![1.0]),
        ));
    };
    for (piece, w) in parse_weights(text) {
        for word in piece.split_whitespace() {
            let mut t = tok.encode(word);
            let long = t.len() >= LONG_WORD;
            while !t.is_empty() {
                if ids.len() + t.len() > CONTEXT - 1 {
                    if long {
                        let room = CONTEXT - 1 - ids.len();
                        ids.extend(t.drain(..room));
                        weights.resize(ids.len(), w);
                    }
                    close(&mut ids, &mut weights, &mut done);
                } else {
                    weights.resize(ids.len() + t.len(), w);
                    ids.append(&mut t);
                }
            }
        }
    }
    close(&mut ids, &mut weights, &mut done);
    done
}

/// A text encoder: `[batch][77]` ids to `[batch, 77, dim]` states.
pub type TextEncoder<'a> = &'a dyn Fn(&[Vec<u32>]) -> Result<Tensor, NodeError>;

/// Conditioning of a prompt: `encode(ids)` maps `[batch][77]` ids to `[batch, 77, dim]`
/// states; the result is `[1, 77 * windows, dim]` with weights applied.
pub fn encode_prompt(
    tok: &ClipTokenizer,
    text: &str,
    encode: TextEncoder,
) -> Result<Tensor, NodeError> {
    let wins = windows(tok, text);
    let weighted = wins.iter().any(|(_, w)| w.iter().any(|w| *w != 1.0));
    let mut ids: Vec<Vec<u32>> = wins.iter().map(|(i, _)| i.clone()).collect();
    if weighted {
        let mut empty = vec![BOS, EOS];
        empty.resize(CONTEXT, EOS);
        ids.push(empty);
    }
    let states = encode(&ids)?;
    let mut parts = Vec::with_capacity(wins.len());
    for (i, (_, w)) in wins.iter().enumerate() {
        let z = states.narrow(0, i, 1)?;
        if !weighted || w.iter().all(|w| *w == 1.0) {
            parts.push(z);
            continue;
        }
        let empty = states.narrow(0, wins.len(), 1)?;
        let dim = z.dim(2)?;
        let wt = Tensor::from_vec(w.clone(), (1, CONTEXT, 1), z.device())?
            .to_dtype(z.dtype())?
            .broadcast_as((1, CONTEXT, dim))?;
        parts.push(((&z - &empty)?.mul(&wt)? + &empty)?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parentheses_set_and_multiply_weights_as_comfyui_does() {
        let p = parse_weights("a (b:1.5) ((c)) \\(d\\) (e:x) [f]");
        let want: Vec<(String, f32)> = vec![
            ("a ".into(), 1.0),
            ("b".into(), 1.5),
            (" ".into(), 1.0),
            ("c".into(), 1.1 * 1.1),
            (" (d) ".into(), 1.0),
            ("e:x".into(), 1.1),
            (" [f]".into(), 1.0),
        ];
        assert_eq!(p.len(), want.len(), "{p:?}");
        for ((s, w), (ws, ww)) in p.iter().zip(&want) {
            assert_eq!(s, ws);
            assert!((w - ww).abs() < 1e-6, "{s}: {w} vs {ww}");
        }
        // Nested with an explicit weight: the inner weight is absolute.
        assert_eq!(parse_weights("((x:0.5))"), vec![("x".to_string(), 0.5)]);
        // Unbalanced parentheses stay text.
        assert_eq!(
            parse_weights("a (b"),
            vec![("a ".to_string(), 1.0), ("(b".to_string(), 1.0)]
        );
    }

    #[test]
    fn long_prompts_fill_windows_of_75_tokens_without_cutting_short_words() {
        let tok = ClipTokenizer::get();
        let one = tok.encode("bottle");
        assert_eq!(one.len(), 1);
        let text = vec!["bottle"; 100].join(" ");
        let w = windows(tok, &text);
        assert_eq!(w.len(), 2);
        for (ids, weights) in &w {
            assert_eq!((ids.len(), weights.len()), (CONTEXT, CONTEXT));
            assert_eq!(ids[0], BOS);
        }
        assert_eq!(w[0].0[1..76], vec![one[0]; 75][..]);
        assert_eq!(w[0].0[76], EOS);
        assert_eq!(w[1].0[1..26], vec![one[0]; 25][..]);
        assert!(w[1].0[26..].iter().all(|&t| t == EOS));
        // A short prompt is one window, as before.
        assert_eq!(windows(tok, "a cat").len(), 1);
        assert_eq!(windows(tok, "").len(), 1);
        // Weights follow their tokens.
        let w = windows(tok, "a (cat:1.4) dog");
        let cat = tok.encode("cat")[0];
        let at = w[0].0.iter().position(|&t| t == cat).unwrap();
        assert_eq!(w[0].1[at], 1.4);
        assert_eq!(w[0].1[at + 1], 1.0);
    }

    #[test]
    fn weights_scale_each_tokens_state_away_from_the_empty_prompt() {
        use crate::model::clip::{encode_text, ClipTextConfig};
        use crate::model::safetensors::SafetensorsFile;
        use nova_dataflow::WeightSource;
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/models/tiny-sd1/tiny_sd1.safetensors");
        let ckpt = SafetensorsFile::open(&path).unwrap();
        let cfg = ClipTextConfig::from_shapes(&|n| WeightSource::shape(&ckpt, n)).unwrap();
        let tok = ClipTokenizer::get();
        let enc = |text: &str| {
            encode_prompt(tok, text, &|ids| {
                Ok(encode_text(&cfg, ids, &|n| ckpt.read(n))?.1)
            })
            .unwrap()
        };
        let diff = crate::model::max_abs_diff;
        let plain = enc("a cat dog");
        assert_eq!(plain.dims(), &[1, 77, cfg.hidden]);
        // Weight 1 is no weight at all.
        assert_eq!(diff(&enc("a (cat:1.0) dog"), &plain), 0.0);
        // Only the weighted token moves, to empty + 1.5 (state - empty).
        let weighted = enc("a (cat:1.5) dog");
        let empty = enc("");
        let at = windows(tok, "a cat dog")[0]
            .0
            .iter()
            .position(|&t| t == tok.encode("cat")[0])
            .unwrap();
        for pos in 0..77 {
            let (w, p, e) = (
                weighted.narrow(1, pos, 1).unwrap(),
                plain.narrow(1, pos, 1).unwrap(),
                empty.narrow(1, pos, 1).unwrap(),
            );
            let want = if pos == at {
                ((&p - &e).unwrap() * 1.5).unwrap().add(&e).unwrap()
            } else {
                p
            };
            assert!(diff(&w, &want) < 1e-5, "position {pos}");
        }
        // A long prompt is two windows.
        let long = enc(&vec!["bottle"; 100].join(" "));
        assert_eq!(long.dims(), &[1, 154, cfg.hidden]);
    }
}
