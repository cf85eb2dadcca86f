//! Summaries of repeated measurements, as every benchmark reports them.

/// Median of a non-empty slice (sorts a copy).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// "min–max" of `values`, each with `precision` decimals: how far repetitions spread, to judge
/// a median's noise by.
pub fn spread(values: &[f64], precision: usize) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.precision$}–{max:.precision$}")
}
