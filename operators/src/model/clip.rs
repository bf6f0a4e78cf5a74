//! The CLIP text side of Stable Diffusion 1.x: OpenAI's byte-level BPE tokenizer and the
//! text transformer, read from a single-file checkpoint's `cond_stage_model.transformer.`
//! tensors (Hugging Face `CLIPTextModel` names under that prefix).
//!
//! The BPE merges ship with NOVA (`operators/assets/clip/merges.txt`, OpenAI CLIP's
//! vocabulary, MIT licence beside it); the vocabulary is derived from them exactly as CLIP
//! does (256 byte symbols, the same with `</w>`, one entry per merge, then the two special
//! tokens), so nothing is downloaded.

use super::nn::layer_norm;
use candle_core::{Device, Tensor};

fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    super::nn::linear(x, w, Some(b))
}
use nova_dataflow::NodeError;
use regex::Regex;
use std::collections::HashMap;
use std::sync::OnceLock;

/// Start and end of text.
pub const BOS: u32 = 49406;
pub const EOS: u32 = 49407;
/// Tokens per sequence, start and end included.
pub const CONTEXT: usize = 77;

const MERGES: &str = include_str!("../../assets/clip/merges.txt");

/// OpenAI CLIP's tokenizer.
pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    byte_char: [char; 256],
    pattern: Regex,
}

/// CLIP's reversible map from bytes to printable characters, in vocabulary order.
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .map(|(b, c)| (b as u8, char::from_u32(c).expect("valid code point")))
        .collect()
}

impl ClipTokenizer {
    /// The tokenizer, built once per process from the shipped merges.
    pub fn get() -> &'static ClipTokenizer {
        static T: OnceLock<ClipTokenizer> = OnceLock::new();
        T.get_or_init(ClipTokenizer::build)
    }

    fn build() -> ClipTokenizer {
        let table = bytes_to_unicode();
        let mut byte_char = ['\0'; 256];
        for (b, c) in &table {
            byte_char[*b as usize] = *c;
        }
        let mut vocab: Vec<String> = table.iter().map(|(_, c)| c.to_string()).collect();
        vocab.extend(table.iter().map(|(_, c)| format!("{c}</w>")));
        let mut ranks = HashMap::new();
        for (rank, line) in MERGES.lines().skip(1).take(49152 - 256 - 2).enumerate() {
            if let Some((a, b)) = line.split_once(' ') {
                ranks.insert((a.to_string(), b.to_string()), rank);
                vocab.push(format!("{a}{b}"));
            }
        }
        vocab.push("<|startoftext|>".into());
        vocab.push("<|endoftext|>".into());
        let encoder = vocab
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        let pattern = Regex::new(
            r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
        )
        .expect("CLIP's token pattern compiles");
        ClipTokenizer {
            encoder,
            ranks,
            byte_char,
            pattern,
        }
    }

    /// The vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.encoder.len()
    }

    /// A token's id.
    pub fn id(&self, token: &str) -> Option<u32> {
        self.encoder.get(token).copied()
    }

    /// Byte-pair merges of one pre-token (already mapped to byte characters).
    fn bpe(&self, word: &str) -> Vec<String> {
        let chars: Vec<char> = word.chars().collect();
        let mut parts: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        if let Some(last) = parts.last_mut() {
            last.push_str("</w>");
        }
        loop {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|r| (*r, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let (a, b) = (parts[i].clone(), parts[i + 1].clone());
            // Merge every occurrence of the pair, left to right.
            let mut merged = Vec::with_capacity(parts.len());
            let mut j = 0;
            while j < parts.len() {
                if j + 1 < parts.len() && parts[j] == a && parts[j + 1] == b {
                    merged.push(format!("{a}{b}"));
                    j += 2;
                } else {
                    merged.push(parts[j].clone());
                    j += 1;
                }
            }
            parts = merged;
        }
        parts
    }

    /// Token ids of `text`, without start and end tokens.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let clean = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let lower = clean.to_lowercase();
        let mut ids = Vec::new();
        for m in self.pattern.find_iter(&lower) {
            let mapped: String = m
                .as_str()
                .bytes()
                .map(|b| self.byte_char[b as usize])
                .collect();
            for piece in self.bpe(&mapped) {
                if let Some(id) = self.encoder.get(&piece) {
                    ids.push(*id);
                }
            }
        }
        ids
    }

    /// `[start, tokens (at most 75), end, end...]`, 77 ids: SD1's padding with the end token.
    pub fn encode_padded(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![BOS];
        ids.extend(self.encode(text).into_iter().take(CONTEXT - 2));
        ids.push(EOS);
        ids.resize(CONTEXT, EOS);
        ids
    }
}

/// The prefix of the text model's tensors in a single-file SD1 checkpoint.
pub const PREFIX: &str = "cond_stage_model.transformer.text_model.";

/// A CLIP text transformer's shape, read from its tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipTextConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub positions: usize,
}

impl ClipTextConfig {
    /// Reads the shape from tensor shapes; `heads` from the hidden size (64 per head, as
    /// every CLIP text model has; smaller models keep 8-wide heads).
    pub fn from_shapes(shape: &dyn Fn(&str) -> Option<Vec<usize>>) -> Result<Self, String> {
        let pos = shape(&format!("{PREFIX}embeddings.position_embedding.weight"))
            .ok_or("tensor 'embeddings.position_embedding.weight' is missing")?;
        let mut layers = 0;
        while shape(&format!(
            "{PREFIX}encoder.layers.{layers}.layer_norm1.weight"
        ))
        .is_some()
        {
            layers += 1;
        }
        let hidden = pos[1];
        let heads = if hidden >= 64 {
            hidden / 64
        } else {
            (hidden / 8).max(1)
        };
        Ok(ClipTextConfig {
            hidden,
            layers,
            heads,
            positions: pos[0],
        })
    }
}

/// Runs the text transformer on `ids` (`[batch][77]`); returns every layer's output (index
/// `i` = after layer `i`, before the final norm) and the final normed output.
pub fn encode_text(
    cfg: &ClipTextConfig,
    ids: &[Vec<u32>],
    get: &dyn Fn(&str) -> Result<Tensor, NodeError>,
) -> Result<(Vec<Tensor>, Tensor), NodeError> {
    let g = |s: &str| get(&format!("{PREFIX}{s}"));
    let n = ids.first().map(|v| v.len()).unwrap_or(0);
    let b = ids.len();
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    let idx = Tensor::from_vec(flat, b * n, &Device::Cpu)?;
    let tok = g("embeddings.token_embedding.weight")?.index_select(&idx, 0)?;
    let pos = g("embeddings.position_embedding.weight")?.narrow(0, 0, n)?;
    let mut x = tok.reshape((b, n, cfg.hidden))?.broadcast_add(&pos)?;
    // Causal mask: position i sees 0..=i.
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (n, n), &Device::Cpu)?;
    let (h, hd) = (cfg.heads, cfg.hidden / cfg.heads);
    let mut states = Vec::with_capacity(cfg.layers);
    for l in 0..cfg.layers {
        let p = |s: &str| g(&format!("encoder.layers.{l}.{s}"));
        let r = x.clone();
        let y = layer_norm(&x, &p("layer_norm1.weight")?, &p("layer_norm1.bias")?)?;
        let proj = |name: &str| -> Result<Tensor, NodeError> {
            let t = linear(
                &y,
                &p(&format!("self_attn.{name}.weight"))?,
                &p(&format!("self_attn.{name}.bias"))?,
            )?;
            Ok(t.reshape((b, n, h, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = (proj("q_proj")?, proj("k_proj")?, proj("v_proj")?);
        let att = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?.broadcast_add(&mask)?;
        let att = super::nn::softmax_last_scaled(&att, 1.0)?;
        let o = att
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, n, cfg.hidden))?;
        let o = linear(
            &o,
            &p("self_attn.out_proj.weight")?,
            &p("self_attn.out_proj.bias")?,
        )?;
        x = (o + r)?;
        let r = x.clone();
        let y = layer_norm(&x, &p("layer_norm2.weight")?, &p("layer_norm2.bias")?)?;
        let y = linear(&y, &p("mlp.fc1.weight")?, &p("mlp.fc1.bias")?)?;
        // quick_gelu: x * sigmoid(1.702 x)
        let y = (&y
            * candle_core::Tensor::exp(&(&y * -1.702)?)?
                .affine(1.0, 1.0)?
                .recip()?)?;
        let y = linear(&y, &p("mlp.fc2.weight")?, &p("mlp.fc2.bias")?)?;
        x = (y + r)?;
        states.push(x.clone());
    }
    let last = layer_norm(
        &x,
        &g("final_layer_norm.weight")?,
        &g("final_layer_norm.bias")?,
    )?;
    Ok((states, last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::safetensors::SafetensorsFile;
    use nova_dataflow::WeightSource;
    use std::path::PathBuf;

    fn shared(rel: &str) -> PathBuf {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/models")
            .join(rel);
        assert!(p.exists(), "missing {}", p.display());
        p
    }

    #[test]
    fn the_tokenizer_matches_the_reference_ids_and_vocabulary() {
        let t = ClipTokenizer::get();
        assert_eq!(t.vocab_size(), 49408);
        let vocab: HashMap<String, u32> = serde_json::from_str(
            &std::fs::read_to_string(shared("clip_tokenizer/vocab.json")).unwrap(),
        )
        .unwrap();
        for (tok, id) in &vocab {
            assert_eq!(t.id(tok), Some(*id), "{tok}");
        }
        let refs: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
            &std::fs::read_to_string(shared("clip_tokenizer/reference_ids.json")).unwrap(),
        )
        .unwrap();
        assert!(refs.len() >= 5);
        for (text, ids) in refs {
            let want: Vec<u32> = ids
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let mut got = vec![BOS];
            got.extend(t.encode(&text));
            got.push(EOS);
            assert_eq!(got, want, "{text:?}");
        }
        let padded = t.encode_padded("a photo of a cat");
        assert_eq!(padded.len(), 77);
        assert_eq!(&padded[..8], &[BOS, 320, 1125, 539, 320, 2368, EOS, EOS]);
    }

    #[test]
    fn the_tiny_text_encoder_matches_its_reference_states() {
        let ckpt = SafetensorsFile::open(&shared("tiny-sd1/tiny_sd1.safetensors")).unwrap();
        let r = SafetensorsFile::open(&shared("tiny-sd1/reference.safetensors")).unwrap();
        let ids: Vec<u32> = r
            .read("input_ids")
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|v| v as u32)
            .collect();
        let tok = ClipTokenizer::get().encode_padded("a photo of a cat");
        assert_eq!(ids, tok, "reference ids are the padded prompt");
        let cfg = ClipTextConfig::from_shapes(&|n| ckpt.shape(n).map(|s| s.to_vec())).unwrap();
        assert_eq!((cfg.hidden, cfg.layers), (32, 3));
        let (states, last) = encode_text(&cfg, &[ids], &|n| ckpt.read(n)).unwrap();
        let diff = crate::model::max_abs_diff;
        let e_last = diff(&last, &r.read("text_last_hidden_state").unwrap());
        let e_pen = diff(
            &states[cfg.layers - 2],
            &r.read("text_penultimate_hidden_state").unwrap(),
        );
        eprintln!("text encoder: last max |err| {e_last:.2e}, penultimate {e_pen:.2e}");
        assert!(
            e_last < 1e-3 && e_pen < 1e-3,
            "last {e_last}, penultimate {e_pen}"
        );
    }
}
