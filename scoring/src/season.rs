//! Whether a window history is seasonal, and its period: Fisher's g test on the periodogram.
//!
//! A period is only worth modelling (MSTL instead of AutoETS) when the history shows it beyond
//! what noise does. augurs' periodogram detector reports the peaks within a fraction of the
//! highest power, and the highest power is always there: on the short histories a scorer fits
//! (60 windows) it found a "season" in almost every series of white noise (its Welch estimate
//! has only a handful of frequencies to choose from), and a spurious season both costs an MSTL
//! fit and bends the forecast with a pattern that is not there.
//!
//! So the history (less its least-squares line, so that a trend is not read as a long period) is
//! transformed at its Fourier frequencies `k/n`, and the strongest ordinate `I_k` among the
//! periods `n/k` in `[min_season, n/3]` is tested against all of them: under white noise,
//! `g = I_k / Σ I_j` exceeds `x` with probability at most `m·(1 − x)^(m−1)` (Fisher, 1929; `m`
//! ordinates; the first term of the exact distribution, an upper bound and accurate where it is
//! small). The period is `n/k` rounded, when that probability is below [`SIGNIFICANCE`].
//!
//! Known limit: the periods are resolved only as finely as the Fourier frequencies of the
//! history, so a strong cycle a little longer than a third of it (24 windows in 60) leaks into
//! the longest period looked for (20) and is modelled with that.

/// The largest chance of white noise showing a season this strong for it to be modelled.
pub(crate) const SIGNIFICANCE: f64 = 0.01;

/// The seasonal period of `history` in windows, if it has a significant one in
/// `[min_season, len/3]`.
pub(crate) fn period(history: &[f64], min_season: usize) -> Option<usize> {
    let n = history.len();
    if min_season < 2 || n < 3 * min_season {
        return None;
    }
    // Residuals from the least-squares line.
    let nf = n as f64;
    let t_mean = (nf - 1.0) / 2.0;
    let y_mean = history.iter().sum::<f64>() / nf;
    let (mut sty, mut stt) = (0.0, 0.0);
    for (t, y) in history.iter().enumerate() {
        let dt = t as f64 - t_mean;
        sty += dt * (y - y_mean);
        stt += dt * dt;
    }
    let slope = if stt > 0.0 { sty / stt } else { 0.0 };
    let residuals: Vec<f64> = history
        .iter()
        .enumerate()
        .map(|(t, y)| y - y_mean - slope * (t as f64 - t_mean))
        .collect();
    // Periodogram at k = 1..=m (m = (n-1)/2: the ordinates below the Nyquist frequency).
    let m = (n - 1) / 2;
    let mut total = 0.0;
    let mut best: Option<(usize, f64)> = None;
    for k in 1..=m {
        // exp(-2πi·k·t/n) by rotation, one step per t.
        let angle = std::f64::consts::TAU * k as f64 / nf;
        let (step_sin, step_cos) = angle.sin_cos();
        let (mut c, mut s) = (1.0_f64, 0.0_f64);
        let (mut re, mut im) = (0.0, 0.0);
        for r in &residuals {
            re += r * c;
            im -= r * s;
            (c, s) = (c * step_cos - s * step_sin, s * step_cos + c * step_sin);
        }
        let power = re * re + im * im;
        total += power;
        let period = nf / k as f64;
        let admissible = period >= min_season as f64 && period <= nf / 3.0;
        if admissible && best.is_none_or(|(_, p)| power > p) {
            best = Some((k, power));
        }
    }
    let (k, power) = best?;
    if !(total > 0.0 && total.is_finite()) {
        return None;
    }
    let g = power / total;
    let p_value = m as f64 * (1.0 - g).powi(m as i32 - 1);
    (p_value < SIGNIFICANCE).then(|| (nf / k as f64).round() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ets::tests::noise;

    fn series(n: usize, seed: usize, f: impl Fn(usize) -> f64) -> Vec<f64> {
        (0..n).map(|i| f(i) + noise(seed * 1_000 + i)).collect()
    }

    #[test]
    fn white_noise_is_rarely_seasonal() {
        // 500 series of noise, alone and on a trend: at most about 1% may look seasonal.
        for trend in [0.0, 0.05] {
            let seasonal = (0..500)
                .filter(|&seed| period(&series(60, seed, |i| trend * i as f64), 4).is_some())
                .count();
            assert!(seasonal <= 10, "{seasonal} of 500 (trend {trend})");
        }
    }

    #[test]
    fn a_real_season_is_found_with_its_period() {
        for p in [4usize, 6, 12, 20] {
            for seed in 0..20 {
                let y = series(60, seed, |i| {
                    0.02 * i as f64 + 0.6 * (std::f64::consts::TAU * i as f64 / p as f64).sin()
                });
                assert_eq!(period(&y, 4), Some(p), "period {p}, seed {seed}");
            }
        }
    }

    #[test]
    fn periods_outside_the_range_and_short_histories_are_not_looked_for() {
        // A period of 30 in 60 windows is longer than a third of the history.
        let y = series(60, 1, |i| {
            3.0 * (std::f64::consts::TAU * i as f64 / 30.0).sin()
        });
        assert_eq!(period(&y, 4), None);
        // Period 3 is shorter than the shortest looked for.
        let y = series(60, 2, |i| {
            3.0 * (std::f64::consts::TAU * i as f64 / 3.0).sin()
        });
        assert_eq!(period(&y, 4), None);
        assert_eq!(period(&y[..11], 4), None);
        assert_eq!(period(&y, 0), None);
        assert_eq!(period(&[5.0; 60], 4), None);
    }
}
