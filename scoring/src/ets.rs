//! The recursion of a fitted additive-error, non-seasonal exponential smoothing model (ETS(A,N,N),
//! ETS(A,A,N) or ETS(A,Ad,N): Hyndman, Koehler, Ord and Snyder, *Forecasting with Exponential
//! Smoothing*, 2008, class 1), so that a fitted forecast is carried forward from its state between
//! refits: each new value updates the level and trend with the fitted smoothing parameters, and
//! the forecast and its variance are read from the updated state.
//!
//! augurs fits the model but keeps its parameters and final state private. Both are determined by
//! what it does publish, the forecast and its interval: the point forecasts are
//! `l + (φ + … + φ^h)·b`, and the forecast variances `σ²·(1 + Σ_{j<h} c_j²)` with
//! `c_j = α + β·φ·(1 − φ^j)/(1 − φ)` (`α + β·j` undamped, `α` without trend). [`EtsFilter::recover`]
//! solves the first three steps of each for the parameters and state, then checks that they
//! reproduce every step of the forecast and its interval, and refuses them otherwise (the caller
//! then reads the fitted forecast further along instead).
//!
//! The update after a new value `y` (the model's own equations, as augurs fits them):
//! `e = y − (l + φ·b)`, `l ← l + φ·b + α·e`, `b ← φ·b + β·e`.

use serde::{Deserialize, Serialize};

/// The fitted model's parameters and its state after the newest value it has seen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct EtsFilter {
    level: f64,
    /// 0 without a trend.
    trend: f64,
    alpha: f64,
    /// 0 without a trend.
    beta: f64,
    /// 1 for an undamped trend (and without one).
    phi: f64,
    /// One-step forecast variance.
    sigma2: f64,
}

/// Relative agreement required between the recovered model's forecast and the fitted one.
const AGREEMENT: f64 = 1e-6;

impl EtsFilter {
    /// The parameters and state of the non-seasonal additive model (`trend`, `damped`) that made
    /// `points` with standard deviations `sds` (at least three steps), if they reproduce all of
    /// them.
    pub(crate) fn recover(points: &[f64], sds: &[f64], trend: bool, damped: bool) -> Option<Self> {
        if points.len() < 3 || sds.len() != points.len() {
            return None;
        }
        let sigma2 = sds[0] * sds[0];
        if !(sigma2.is_finite() && sigma2 > 0.0) {
            return None;
        }
        // Σ_{j<h} c_j² for h = 2, 3.
        let r2 = sds[1] * sds[1] / sigma2 - 1.0;
        let r3 = sds[2] * sds[2] / sigma2 - 1.0;
        let c1 = r2.max(0.0).sqrt();
        let c2 = (r3 - r2).max(0.0).sqrt();
        let filter = if !trend {
            Self {
                level: points[0],
                trend: 0.0,
                alpha: c1,
                beta: 0.0,
                phi: 1.0,
                sigma2,
            }
        } else {
            let (d1, d2) = (points[1] - points[0], points[2] - points[1]);
            // d_h = φ^(h+1)·b: φ is their ratio when damped (c_j's increments say the same, and
            // serve when the trend is flat).
            let phi = if !damped {
                1.0
            } else if d1.abs() > f64::EPSILON * points[0].abs().max(1.0) * 1e3 {
                d2 / d1
            } else {
                if sds.len() < 4 || (c2 - c1).abs() < f64::EPSILON {
                    return None;
                }
                let c3 = (sds[3].powi(2) / sigma2 - 1.0 - r3).max(0.0).sqrt();
                (c3 - c2) / (c2 - c1)
            };
            if !(phi.is_finite() && phi > 0.0 && phi <= 1.0) {
                return None;
            }
            let b = d1 / (phi * phi);
            let beta = (c2 - c1) / (phi * phi);
            Self {
                level: points[0] - phi * b,
                trend: b,
                alpha: c1 - beta * phi,
                beta,
                phi,
                sigma2,
            }
        };
        let (mut p, mut s) = (Vec::new(), Vec::new());
        filter.forecast(points.len(), &mut p, &mut s);
        let agrees = |a: &[f64], b: &[f64]| {
            a.iter().zip(b).all(|(x, y)| {
                let scale = x.abs().max(y.abs()).max(sds[0]);
                (x - y).abs() <= AGREEMENT * scale
            })
        };
        (agrees(&p, points) && agrees(&s, sds)).then_some(filter)
    }

    /// The forecast of the next value and its standard deviation.
    pub(crate) fn next(&self) -> (f64, f64) {
        (self.level + self.phi * self.trend, self.sigma2.sqrt())
    }

    /// Moves the state on by one observed value.
    pub(crate) fn update(&mut self, y: f64) {
        let damped_trend = self.phi * self.trend;
        let error = y - (self.level + damped_trend);
        self.level += damped_trend + self.alpha * error;
        self.trend = damped_trend + self.beta * error;
    }

    /// The forecast of the next `steps` values and their standard deviations, into `points`
    /// and `sds` (replacing what they held).
    pub(crate) fn forecast(&self, steps: usize, points: &mut Vec<f64>, sds: &mut Vec<f64>) {
        points.clear();
        sds.clear();
        // φ + … + φ^h, and Σ_{j<h} c_j² with c_j = α + β·(φ + … + φ^j).
        let (mut phi_sum, mut phi_pow, mut c_sum2) = (0.0, 1.0, 0.0);
        for h in 0..steps {
            if h > 0 {
                let c = self.alpha + self.beta * phi_sum;
                c_sum2 += c * c;
            }
            phi_pow *= self.phi;
            phi_sum += phi_pow;
            points.push(self.level + phi_sum * self.trend);
            sds.push((self.sigma2 * (1.0 + c_sum2)).sqrt());
        }
    }

    /// Whether every field is a number in its range (for checkpoints read back).
    pub(crate) fn validate(&self) -> Result<(), String> {
        let ok = [self.level, self.trend, self.alpha, self.beta, self.phi]
            .iter()
            .all(|v| v.is_finite())
            && self.sigma2.is_finite()
            && self.sigma2 > 0.0
            && self.phi > 0.0
            && self.phi <= 1.0;
        if ok {
            Ok(())
        } else {
            Err(format!(
                "exponential smoothing state out of range: {self:?}"
            ))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use augurs::{
        Predict as _,
        ets::model::{ErrorComponent, ModelType, Params, SeasonalComponent, TrendComponent, Unfit},
    };

    use super::*;

    /// Deterministic noise in [-0.5, 0.5), without a period.
    pub(crate) fn noise(i: usize) -> f64 {
        let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^= x >> 31;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^= x >> 29;
        (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    }

    /// augurs' fit of one model form (no trend, trend, damped trend) to `y`, as the scorer fits
    /// it, and its forecast of `steps` steps with standard deviations.
    fn fitted(trend: bool, damped: bool, y: &[f64], steps: usize) -> (Vec<f64>, Vec<f64>) {
        let f = crate::fit_form(trend, damped, y)
            .expect("fit")
            .predict(steps, 0.95)
            .expect("predict");
        let iv = f.intervals.expect("intervals");
        let z = 1.959_963_984_540_054;
        let sds = iv
            .upper
            .iter()
            .zip(&iv.lower)
            .map(|(u, l)| (u - l) / (2.0 * z))
            .collect();
        (f.point, sds)
    }

    #[test]
    fn recovers_every_additive_non_seasonal_model_augurs_fits() {
        type Curve = Box<dyn Fn(usize) -> f64>;
        let series: [(&str, Curve); 4] = [
            ("level", Box::new(|i| 50.0 + 3.0 * noise(i))),
            (
                "trend",
                Box::new(|i| 10.0 + 0.4 * i as f64 + 2.0 * noise(i)),
            ),
            (
                "walk",
                Box::new(|i| (0..=i).map(|k| noise(k + 7)).sum::<f64>() * 5.0 + 1e4),
            ),
            (
                "curve",
                Box::new(|i| 80.0 - 60.0 * (-(i as f64) / 20.0).exp() + noise(i)),
            ),
        ];
        for (name, f) in &series {
            let y: Vec<f64> = (0..60).map(f).collect();
            for (trend, damped) in [(false, false), (true, false), (true, true)] {
                let (points, sds) = fitted(trend, damped, &y, 36);
                let filter = EtsFilter::recover(&points, &sds, trend, damped)
                    .unwrap_or_else(|| panic!("{name} {trend} {damped}: not recovered"));
                filter.validate().expect("in range");
                assert!(
                    filter.alpha > 0.0 && filter.alpha < 1.0,
                    "{name}: {filter:?}"
                );
                assert!(filter.beta >= 0.0 && filter.beta < 1.0, "{filter:?}");
                // Every step, not only the three it was solved from.
                let (mut p, mut s) = (Vec::new(), Vec::new());
                filter.forecast(36, &mut p, &mut s);
                for h in 0..36 {
                    assert!((p[h] - points[h]).abs() <= 1e-6 * points[h].abs().max(sds[0]));
                    assert!(
                        (s[h] - sds[h]).abs() <= 1e-6 * sds[h],
                        "{name} {trend} {damped} {h}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_forecast_it_did_not_make_is_refused() {
        let y: Vec<f64> = (0..60).map(|i| 20.0 + 0.3 * i as f64 + noise(i)).collect();
        let (points, mut sds) = fitted(true, true, &y, 24);
        assert!(EtsFilter::recover(&points, &sds, true, true).is_some());
        // Intervals widening by another law (as MSTL's or a seasonal model's may).
        for (h, s) in sds.iter_mut().enumerate() {
            *s *= 1.0 + 0.01 * (h * h) as f64;
        }
        assert_eq!(EtsFilter::recover(&points, &sds, true, true), None);
        assert_eq!(
            EtsFilter::recover(&points[..2], &sds[..2], true, true),
            None
        );
        assert_eq!(EtsFilter::recover(&[1.0; 5], &[0.0; 5], false, false), None);
    }

    #[test]
    fn a_stepped_filter_forecasts_as_the_model_fitted_to_the_longer_history() {
        // A random walk: α near 1, so the state after 70 values hardly depends on the initial
        // level the two fits estimate, and the filter stepped over the last 10 values must
        // forecast what augurs' model with the same α, fitted to all 70, does.
        let y: Vec<f64> = (0..70)
            .map(|i| 100.0 + 4.0 * (0..=i).map(|k| noise(k + 3)).sum::<f64>())
            .collect();
        let (points, sds) = fitted(false, false, &y[..60], 12);
        let mut filter = EtsFilter::recover(&points, &sds, false, false).expect("recovered");
        assert!(filter.alpha > 0.9, "{filter:?}");
        for v in &y[60..] {
            filter.update(*v);
        }
        let longer = Unfit::new(ModelType {
            error: ErrorComponent::Additive,
            trend: TrendComponent::None,
            season: SeasonalComponent::None,
        })
        .params(Params {
            alpha: filter.alpha,
            ..Params::default()
        })
        .fit(&y)
        .expect("fit")
        .predict(3, None)
        .expect("predict");
        let (mean, _) = filter.next();
        assert!(
            (mean - longer.point[0]).abs() < 1e-6 * mean.abs(),
            "{mean} vs {}",
            longer.point[0]
        );
        // Without the update it would be off by the walk's last 10 steps.
        assert!((points[0] - longer.point[0]).abs() > 1e-3, "{points:?}");
    }

    #[test]
    fn updates_follow_the_model_equations() {
        let mut f = EtsFilter {
            level: 10.0,
            trend: 2.0,
            alpha: 0.5,
            beta: 0.1,
            phi: 0.9,
            sigma2: 4.0,
        };
        assert_eq!(f.next(), (11.8, 2.0));
        // As expected: the level and trend move on, nothing is learned.
        f.update(11.8);
        assert!((f.level - 11.8).abs() < 1e-12 && (f.trend - 1.8).abs() < 1e-12);
        // 2 above the forecast: level + α·2, trend + β·2.
        let (mean, _) = f.next();
        f.update(mean + 2.0);
        assert!((f.level - (11.8 + 0.9 * 1.8 + 1.0)).abs() < 1e-12, "{f:?}");
        assert!((f.trend - (0.9 * 1.8 + 0.2)).abs() < 1e-12, "{f:?}");
        // The variance of step h: σ²(1 + Σ_{j<h} (α + β(φ + … + φ^j))²).
        let (mut p, mut s) = (Vec::new(), Vec::new());
        f.forecast(3, &mut p, &mut s);
        let c1: f64 = 0.5 + 0.1 * 0.9;
        let c2: f64 = 0.5 + 0.1 * (0.9 + 0.81);
        assert!((s[1] - (4.0 * (1.0 + c1 * c1)).sqrt()).abs() < 1e-12);
        assert!((s[2] - (4.0 * (1.0 + c1 * c1 + c2 * c2)).sqrt()).abs() < 1e-12);
        assert!((p[2] - (f.level + (0.9 + 0.81 + 0.729) * f.trend)).abs() < 1e-12);
        let bad = EtsFilter { phi: 1.5, ..f };
        assert!(bad.validate().is_err());
    }
}
