//! Changes of regime: Bayesian online changepoint detection (Adams and MacKay, 2007), stepped once
//! per window on a state kept per series.
//!
//! The model is the one augurs' BOCPD detector uses with a Normal-Gamma prior: within a run the
//! values are Normal with unknown mean and precision, `NormalGamma(m, r, s, v)` in `rv`'s
//! parametrisation (precision ~ Gamma(v/2, rate s/2), mean ~ Normal(m, 1/(r precision))), and a
//! run ends after each value with probability `1 / hazard`. After every value the detector holds
//! the posterior probability of each run length (how many values ago the current regime began).
//!
//! Why not augurs' detector itself: it is a batch detector (a whole history in, changepoints out),
//! and its online core keeps every run length for as long as the series lives, so memory and the
//! time of a step grow with the series' age. Run from scratch over a window's carried history
//! instead, it cost up to 2,080 posterior predictive evaluations (each with two `lgamma`s) per
//! series and window. Here a step costs at most [`MAX_RUN`] evaluations, with no `lgamma` and no
//! logarithm or exponential: in a run of `n` values `v = r = 1 + n`, so the Student t's constant
//! `Γ((v+1)/2) / (Γ(v/2) √π) · √(r/(r+1))` depends on `n` alone and is tabulated once (its
//! `lnΓ((v+1)/2) - lnΓ(v/2)` from its predecessor by `lnΓ(a + 1) = ln a + lnΓ(a)`); and its
//! kernel `(1 + d²/scale)^(-(v+1)/2)` is `(s/s')^((n+2)/2)`, `s'` being `s` of the run updated
//! with the value: an integer power, times a square root for odd `n`. So the probabilities are
//! kept as they are, not as logarithms, and normalised by their sum. (As logarithms, a step took
//! a logarithm and an exponential per run: 9 % of a replay's instructions.)
//!
//! **Bounded.** At most [`MAX_RUN`] run lengths are kept: runs of `MAX_RUN` values or more share
//! the last slot, judged by the statistics of their newest `MAX_RUN` values (each step the oldest
//! run is folded into the next: probabilities added, the younger run's statistics kept). So the
//! longest regime it sees is as long as the history the feature stage carries by default.
//!
//! **Scale.** A new run's prior is centred on the mean of the series' recent history, with that
//! history's variance as its scale (`NormalGamma(0, 1, 1, 1)` on standardised values, as the
//! scorer used to run augurs' detector): the reference is taken when the run starts, so a run's
//! posterior never changes after the fact and the step stays incremental.

use std::{collections::VecDeque, sync::LazyLock};

use serde::{Deserialize, Serialize};

/// Most run lengths kept per series (runs this long or longer share the last one).
pub const MAX_RUN: usize = 64;

/// The predictive density's constant for a run of `n = 0..=MAX_RUN` values (`v = r = 1 + n`):
/// `Γ((v+1)/2) / (Γ(v/2) √π) · √(r / (r+1))`; the density of `x` is this times
/// `(s/s')^((n+2)/2) / √s`.
static DENSITY_CONSTANT: LazyLock<[f64; MAX_RUN + 1]> = LazyLock::new(|| {
    // g(a) = lnΓ(a + 1/2) - lnΓ(a); g(1/2) = -ln(π)/2; g(a + 1/2) = ln(a) - g(a).
    let mut g = [0.0; MAX_RUN + 1];
    g[0] = -0.5 * std::f64::consts::PI.ln();
    for n in 1..=MAX_RUN {
        let a = n as f64 / 2.0;
        g[n] = a.ln() - g[n - 1];
    }
    std::array::from_fn(|n| {
        let r = n as f64 + 1.0;
        (g[n] - HALF_LN_PI - 0.5 * ((r + 1.0) / r).ln()).exp()
    })
});

/// `ln(π) / 2`.
const HALF_LN_PI: f64 = 0.572_364_942_924_700_1;

/// Probabilities below this are taken as 0, so that no arithmetic runs on subnormal numbers
/// (far slower on most processors): such a run length is as good as ruled out.
const NEGLIGIBLE: f64 = 1e-300;

/// The prior of a run starting now: centred on `mean`, scaled by `variance` (both of the
/// series' recent history).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reference {
    /// Prior location of a new run's mean.
    pub mean: f64,
    /// Prior scale (`s` of the Normal-Gamma) of a new run, a variance.
    pub variance: f64,
}

impl Reference {
    /// The reference of a history: its mean, and its variance floored at a billionth of the
    /// squared level (a constant history still gives a proper prior).
    pub fn of(history: &[f64]) -> Option<Self> {
        if history.is_empty() {
            return None;
        }
        let n = history.len() as f64;
        let mean = history.iter().sum::<f64>() / n;
        let variance = history.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let floor = (mean.abs().max(1.0) * 1e-9).powi(2);
        (mean.is_finite() && variance.is_finite()).then_some(Self {
            mean,
            variance: variance.max(floor),
        })
    }
}

/// One run length's posterior.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Run {
    /// P(this run length | values so far).
    p: f64,
    /// Posterior location `m`.
    m: f64,
    /// Posterior `s` (prior scale plus the run's sum of squared deviations).
    s: f64,
}

/// The run-length posterior of one series; its serialised form is its exact state (the runs,
/// shortest first, as a sequence).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChangeDetector {
    /// Run `i` holds the newest `i + 1` values (the last slot: at least `MAX_RUN`).
    runs: VecDeque<Run>,
}

/// A detector as the scorer's state versions 2 to 4 stored it: each run's probability as its
/// logarithm. Read into a [`ChangeDetector`] (the probabilities by their exponentials).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogChangeDetector {
    runs: VecDeque<LogRun>,
}

/// A run as [`LogChangeDetector`] stored it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct LogRun {
    log_p: f64,
    m: f64,
    s: f64,
}

impl From<LogChangeDetector> for ChangeDetector {
    fn from(old: LogChangeDetector) -> Self {
        let runs = old
            .runs
            .into_iter()
            .map(|r| Run {
                p: r.log_p.exp(),
                m: r.m,
                s: r.s,
            })
            .collect();
        Self { runs }
    }
}

/// The old form of a detector (for tests of reading it).
#[cfg(test)]
impl From<&ChangeDetector> for LogChangeDetector {
    fn from(d: &ChangeDetector) -> Self {
        let runs = d
            .runs
            .iter()
            .map(|r| LogRun {
                log_p: r.p.ln(),
                m: r.m,
                s: r.s,
            })
            .collect();
        Self { runs }
    }
}

impl Run {
    /// A run's prior: no values yet.
    fn prior(p: f64, reference: Reference) -> Self {
        Self {
            p,
            m: reference.mean,
            s: reference.variance,
        }
    }

    /// A run of the one value `x`, holding all the probability (a detector's first run, or a
    /// fresh start).
    fn only(reference: Reference, x: f64) -> Self {
        Self {
            p: 1.0,
            ..Self::prior(1.0, reference).grown(0, x, 1.0, &DENSITY_CONSTANT)
        }
    }

    /// This run of `n` values (`r = v = 1 + n`) with its probability multiplied by the
    /// posterior predictive density of `x` (and by `grow`, the prior probability that the run
    /// goes on), then updated with `x`.
    ///
    /// The predictive is a Student t with `v = 1 + n` degrees of freedom, location `m` and
    /// squared scale `scale / v`, `scale = s (r + 1) / r`:
    /// `pp = Γ((v+1)/2) / (Γ(v/2) √(π scale)) · (1 + d²/scale)^(-(v+1)/2)`.
    /// With `s' = s + r d² / (r + 1)` (the updated run's), `1 + d²/scale = s'/s`, so
    /// `pp = DENSITY_CONSTANT[n] · (s/s')^((n+2)/2) / √s`.
    ///
    /// `constants` is [`DENSITY_CONSTANT`], looked up once per step by the caller.
    fn grown(self, n: usize, x: f64, grow: f64, constants: &[f64; MAX_RUN + 1]) -> Self {
        let r = 1.0 + n as f64;
        let d = x - self.m;
        let s = self.s + r * d * d / (r + 1.0);
        let shrink = self.s / s;
        let mut kernel = shrink.powi((n as i32 + 2) / 2);
        if n % 2 == 1 {
            kernel *= shrink.sqrt();
        }
        let pp = constants[n] * kernel / self.s.sqrt();
        Self {
            p: self.p * grow * pp,
            m: self.m + d / (r + 1.0),
            s,
        }
    }
}

impl ChangeDetector {
    /// Takes the next value; returns the most probable run length (0: the regime changed at
    /// this value; `k`: it began `k` values ago), ties to the shorter.
    pub fn step(&mut self, x: f64, reference: Reference, hazard: f64) -> usize {
        if !x.is_finite() {
            return self.most_probable();
        }
        if self.runs.is_empty() {
            self.runs.push_back(Run::only(reference, x));
            return 0;
        }
        let change = hazard.recip();
        let constants = &*DENSITY_CONSTANT;
        // The probabilities sum to one, so a change now has prior mass `1 / hazard`.
        let start = Run::prior(change, reference).grown(0, x, 1.0, constants);
        for (i, run) in self.runs.iter_mut().enumerate() {
            *run = run.grown(i + 1, x, 1.0 - change, constants);
        }
        self.runs.push_front(start);
        if self.runs.len() > MAX_RUN {
            let oldest = self.runs.pop_back().expect("more than MAX_RUN runs");
            let last = self.runs.back_mut().expect("MAX_RUN runs");
            last.p += oldest.p;
        }
        let total: f64 = self.runs.iter().map(|r| r.p).sum();
        if total > 0.0 && total.is_finite() {
            for run in &mut self.runs {
                run.p /= total;
                if run.p < NEGLIGIBLE {
                    run.p = 0.0;
                }
            }
        } else {
            // Nothing explains the value (a numerical extreme): start afresh from it.
            self.runs = VecDeque::from([Run::only(reference, x)]);
        }
        self.most_probable()
    }

    /// The most probable run length so far (0 before any value).
    pub fn most_probable(&self) -> usize {
        let mut best = 0;
        for (i, run) in self.runs.iter().enumerate() {
            if run.p > self.runs[best].p {
                best = i;
            }
        }
        best
    }

    /// The probability of each run length kept, shortest first.
    pub fn run_lengths(&self) -> Vec<f64> {
        self.runs.iter().map(|r| r.p).collect()
    }

    /// Checks a restored state: at most [`MAX_RUN`] runs, finite, probabilities summing to one.
    pub fn validate(&self) -> Result<(), String> {
        if self.runs.len() > MAX_RUN {
            return Err(format!(
                "{} run lengths; at most {MAX_RUN} are kept",
                self.runs.len()
            ));
        }
        if self.runs.iter().any(|r| {
            !((0.0..=1.0).contains(&r.p) && r.m.is_finite() && r.s.is_finite() && r.s > 0.0)
        }) {
            return Err("a run length with a non-finite or impossible posterior".into());
        }
        let total: f64 = self.run_lengths().iter().sum();
        if !self.runs.is_empty() && (total - 1.0).abs() > 1e-6 {
            return Err(format!("run-length probabilities sum to {total}, not 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use augurs::changepoint::{Detector as _, NormalGammaDetector, dist::NormalGamma};
    use distrs::StudentsT;

    fn noise(i: usize) -> f64 {
        // Deterministic, roughly uniform in [-0.5, 0.5).
        let x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    }

    /// Steps a detector through `values` with a fixed reference; the most probable run length
    /// after each.
    fn run(values: &[f64], reference: Reference) -> (ChangeDetector, Vec<usize>) {
        let mut d = ChangeDetector::default();
        let ml = values
            .iter()
            .map(|v| d.step(*v, reference, 250.0))
            .collect();
        (d, ml)
    }

    #[test]
    fn the_predictive_density_is_the_student_t() {
        // After n values a run's predictive is a t with v = 1 + n degrees of freedom, location m
        // and scale sqrt(s (r + 1) / (r v)).
        for n in [0, 1, 2, 7, 30, MAX_RUN] {
            let s = 2.25 * (1 + n) as f64;
            let run = Run { p: 1.0, m: 3.5, s };
            let (r, v) = ((1 + n) as f64, (1 + n) as f64);
            let scale = (run.s * (r + 1.0) / (r * v)).sqrt();
            for x in [-4.0, 0.0, 3.5, 5.0, 40.0] {
                let expected = StudentsT::pdf((x - run.m) / scale, v) / scale;
                let got = run.grown(n, x, 1.0, &DENSITY_CONSTANT).p;
                assert!(
                    (got - expected).abs() < 1e-9 * expected,
                    "n {n}, x {x}: {got} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn a_level_shift_is_found_where_it_happened_and_agrees_with_augurs() {
        let reference = Reference {
            mean: 0.0,
            variance: 1.0,
        };
        for shift_at in [20, 35, 50] {
            let values: Vec<f64> = (0..60)
                .map(|i| 0.3 * noise(i) + if i >= shift_at { 2.0 } else { 0.0 })
                .collect();
            let (_, ml) = run(&values, reference);
            // Before the shift, one regime since the first value; at and after it, the new one.
            assert_eq!(ml[shift_at - 1], shift_at - 1, "{ml:?}");
            for (t, &l) in ml.iter().enumerate().skip(shift_at + 1) {
                assert_eq!(l, t - shift_at, "at {t}: {ml:?}");
            }
            // augurs' batch detector, on the same (already standardised) values, finds the same
            // change (its path of most probable run lengths dates it one value earlier: at the
            // last value of the old regime).
            let mut batch = NormalGammaDetector::normal_gamma(
                250.0,
                NormalGamma::new_unchecked(0.0, 1.0, 1.0, 1.0),
            );
            let found = batch.detect_changepoints(&values);
            assert_eq!(found.last(), Some(&(shift_at - 1)), "{found:?}");
        }
    }

    #[test]
    fn the_reference_makes_it_scale_free() {
        let values: Vec<f64> = (0..80)
            .map(|i| noise(i) + if i >= 50 { 3.0 } else { 0.0 })
            .collect();
        let unit = Reference::of(&values[..50]).unwrap();
        let (_, ml) = run(&values, unit);
        for (scale, offset) in [(1e-3, 0.0), (1e4, 5e4), (7.0, -300.0)] {
            let scaled: Vec<f64> = values.iter().map(|v| v * scale + offset).collect();
            let (_, ml_scaled) = run(&scaled, Reference::of(&scaled[..50]).unwrap());
            assert_eq!(ml, ml_scaled, "scale {scale}, offset {offset}");
        }
    }

    #[test]
    fn its_state_is_bounded_normalised_and_exact_after_a_round_trip() {
        let reference = Reference {
            mean: 10.0,
            variance: 4.0,
        };
        let values: Vec<f64> = (0..500)
            .map(|i| 10.0 + 2.0 * noise(i) + if (i / 150) % 2 == 1 { 6.0 } else { 0.0 })
            .collect();
        let (mut d, ml) = run(&values[..300], reference);
        assert_eq!(d.runs.len(), MAX_RUN);
        d.validate().unwrap();
        // A regime longer than MAX_RUN is held in the last slot.
        assert_eq!(ml[140], MAX_RUN - 1, "{:?}", &ml[100..150]);
        assert!(ml[150..153].iter().all(|&l| l < 3), "{:?}", &ml[148..155]);
        let bytes = foresight_events::encode_state(1, &d);
        let mut restored: ChangeDetector =
            foresight_events::decode_state("series", 1, &bytes).unwrap();
        for v in &values[300..] {
            assert_eq!(
                d.step(*v, reference, 250.0),
                restored.step(*v, reference, 250.0)
            );
        }
        assert_eq!(d, restored);
    }

    #[test]
    fn stationary_noise_rarely_looks_like_a_change() {
        let values: Vec<f64> = (0..2_000).map(noise).collect();
        let reference = Reference::of(&values[..64]).unwrap();
        let (_, ml) = run(&values, reference);
        let recent = ml[64..].iter().filter(|&&l| l < 2).count();
        assert!(recent <= 20, "{recent} of 1,936 steps saw a change");
    }

    #[test]
    fn constant_and_bad_values_are_handled() {
        let reference = Reference::of(&[5.0; 10]).unwrap();
        let (mut d, _) = run(&[5.0; 100], reference);
        d.validate().unwrap();
        assert_eq!(d.step(f64::NAN, reference, 250.0), d.most_probable());
        assert_eq!(d.step(6.0, reference, 250.0), 0);
        d.validate().unwrap();
        let bad = ChangeDetector {
            runs: VecDeque::from([Run {
                p: 1.0,
                m: 1.0,
                s: -1.0,
            }]),
        };
        assert!(bad.validate().is_err());
    }
}
