//! Quality deltas between a tiled/streamed output and the whole one: PSNR and SSIM for
//! images and video frames (8-bit RGB), SNR for audio (f32 samples).

/// Peak signal-to-noise ratio in dB of `b` against `a` (8-bit samples); `None` when they
/// are identical (infinite PSNR) and an error when their sizes differ.
pub fn psnr(a: &[u8], b: &[u8]) -> Result<Option<f64>, String> {
    if a.len() != b.len() || a.is_empty() {
        return Err(format!("sizes differ: {} vs {} samples", a.len(), b.len()));
    }
    let se: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    if se == 0.0 {
        return Ok(None);
    }
    let mse = se / a.len() as f64;
    Ok(Some(10.0 * (255.0f64 * 255.0 / mse).log10()))
}

/// Mean SSIM (Wang et al. 2004: 8x8 windows, stride 4, C1 = (0.01·255)², C2 = (0.03·255)²) of
/// two interleaved RGB images of `w` x `h`, computed on luma (BT.601).
pub fn ssim(a: &[u8], b: &[u8], w: usize, h: usize) -> Result<f64, String> {
    if a.len() != w * h * 3 || b.len() != a.len() {
        return Err(format!(
            "sizes differ: {} and {} bytes for {w}x{h} RGB",
            a.len(),
            b.len()
        ));
    }
    let luma = |p: &[u8]| -> Vec<f64> {
        p.chunks_exact(3)
            .map(|c| 0.299 * c[0] as f64 + 0.587 * c[1] as f64 + 0.114 * c[2] as f64)
            .collect()
    };
    let (la, lb) = (luma(a), luma(b));
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let win = 8.min(w).min(h).max(1);
    let (mut sum, mut n) = (0.0, 0usize);
    let mut y = 0;
    while y + win <= h {
        let mut x = 0;
        while x + win <= w {
            let (mut ma, mut mb) = (0.0, 0.0);
            for j in 0..win {
                for i in 0..win {
                    ma += la[(y + j) * w + x + i];
                    mb += lb[(y + j) * w + x + i];
                }
            }
            let k = (win * win) as f64;
            ma /= k;
            mb /= k;
            let (mut va, mut vb, mut cov) = (0.0, 0.0, 0.0);
            for j in 0..win {
                for i in 0..win {
                    let da = la[(y + j) * w + x + i] - ma;
                    let db = lb[(y + j) * w + x + i] - mb;
                    va += da * da;
                    vb += db * db;
                    cov += da * db;
                }
            }
            let d = (k - 1.0).max(1.0);
            let (va, vb, cov) = (va / d, vb / d, cov / d);
            sum += ((2.0 * ma * mb + c1) * (2.0 * cov + c2))
                / ((ma * ma + mb * mb + c1) * (va + vb + c2));
            n += 1;
            x += 4;
        }
        y += 4;
    }
    Ok(if n == 0 { 1.0 } else { sum / n as f64 })
}

/// Signal-to-noise ratio in dB of `test` against `reference` (the whole output): signal power
/// over the power of their difference; `None` when identical.
pub fn snr(reference: &[f32], test: &[f32]) -> Result<Option<f64>, String> {
    if reference.len() != test.len() || reference.is_empty() {
        return Err(format!(
            "lengths differ: {} vs {} samples",
            reference.len(),
            test.len()
        ));
    }
    let signal: f64 = reference.iter().map(|&x| (x as f64).powi(2)).sum();
    let noise: f64 = reference
        .iter()
        .zip(test)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    if noise == 0.0 {
        return Ok(None);
    }
    Ok(Some(10.0 * (signal / noise).log10()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(w: usize, h: usize) -> Vec<u8> {
        (0..w * h * 3)
            .map(|i| ((i * 37 + i / 7) % 251) as u8)
            .collect()
    }

    #[test]
    fn psnr_of_known_error() {
        let a = vec![100u8; 300];
        let mut b = a.clone();
        // One sample off by 255/…: MSE = 10²/300.
        b[0] = 110;
        let p = psnr(&a, &b).unwrap().unwrap();
        let expected = 10.0 * (255.0f64 * 255.0 / (100.0 / 300.0)).log10();
        assert!((p - expected).abs() < 1e-9, "{p} vs {expected}");
        assert_eq!(psnr(&a, &a).unwrap(), None);
        assert!(psnr(&a, &b[..10]).is_err());
    }

    #[test]
    fn ssim_is_one_for_identical_and_drops_with_noise() {
        let (w, h) = (32, 24);
        let a = pattern(w, h);
        assert!((ssim(&a, &a, w, h).unwrap() - 1.0).abs() < 1e-12);
        let noisy: Vec<u8> = a
            .iter()
            .enumerate()
            .map(|(i, &v)| v.wrapping_add(if i % 2 == 0 { 40 } else { 0 }))
            .collect();
        let s = ssim(&a, &noisy, w, h).unwrap();
        assert!(s < 0.95 && s > -1.0, "ssim {s}");
        let inverted: Vec<u8> = a.iter().map(|&v| 255 - v).collect();
        assert!(ssim(&a, &inverted, w, h).unwrap() < 0.0);
    }

    #[test]
    fn snr_of_scaled_signal() {
        let r: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.1).sin()).collect();
        // A 1% error everywhere: 40 dB.
        let t: Vec<f32> = r.iter().map(|x| x * 1.01).collect();
        let s = snr(&r, &t).unwrap().unwrap();
        assert!((s - 40.0).abs() < 1e-3, "{s}");
        assert_eq!(snr(&r, &r).unwrap(), None);
    }
}
