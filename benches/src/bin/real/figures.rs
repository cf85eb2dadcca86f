//! The headline figures as plain numbers (`real.json`'s `figures`), and the goals the issues
//! set, both from the detailed passes: the largest connection count, one pass per mix.

use serde_json::{Map, Value, json};

use crate::{
    measured::{Measured, Pass, quantile},
    proto::{Mix, Role, Strategy, Tier},
};

/// The figures every mix and strategy gets, in the order they are written.
const FIGURES: [&str; 8] = [
    "ms_per_conn_hour",
    "hung_caught",
    "vanished_caught",
    "hung_p99_ms",
    "vanished_p99_ms",
    "worker_us_per_probe",
    "hung_by_tier",
    "vanished_by_tier",
];

/// A float rounded to 3 decimals (these are measurements, not exact values), or `null`.
fn number(x: Option<f64>) -> Value {
    x.filter(|x| x.is_finite())
        .map_or(Value::Null, |x| json!((x * 1e3).round() / 1e3))
}

/// Figure `name` of `m`, `null` where the strategy did not run or the figure does not apply.
fn figure(m: Option<&Measured>, strategy: Strategy, name: &str) -> Value {
    let Some(m) = m else {
        return Value::Null;
    };
    let tiers = |t: [u64; 2]| {
        if strategy.is_lull() {
            json!({
                "transport": t[Tier::Transport.index()],
                "application": t[Tier::Application.index()],
            })
        } else {
            Value::Null
        }
    };
    match name {
        "ms_per_conn_hour" => number(Some(m.per_conn_hour())),
        "hung_caught" => json!([m.hung_ms.len(), m.of(Role::Hung)]),
        "vanished_caught" => json!([m.vanished_ms.len(), m.of(Role::Vanishing)]),
        "hung_p99_ms" => number(quantile(&m.hung_ms, 0.99)),
        "vanished_p99_ms" => number(quantile(&m.vanished_ms, 0.99)),
        "worker_us_per_probe" => number(m.worker_us_per_probe()),
        "hung_by_tier" => tiers(m.hung_tiers),
        "vanished_by_tier" => tiers(m.vanished_tiers),
        _ => Value::Null,
    }
}

/// Fills `report.figures` in both layouts the issues use: `figures[figure][mix][strategy]`
/// (e.g. `figures.ms_per_conn_hour.standard["lull-ebpf"]`) and `figures[mix][strategy][figure]`
/// (e.g. `figures.standard["lull-ebpf"].ms_per_conn_hour`). Every strategy appears under every
/// mix that ran, `null` where it was not measured.
pub fn figures(report: &mut lull_benches::BenchReport, passes: &[&Pass]) {
    let mut by_figure = Map::new();
    let mut by_mix = Map::new();
    for name in FIGURES {
        let mut mixes = Map::new();
        for pass in passes {
            let strategies: Map<String, Value> = Strategy::ALL
                .iter()
                .map(|&s| (s.label().into(), figure(pass.measured(s), s, name)))
                .collect();
            mixes.insert(pass.mix.label().into(), Value::Object(strategies));
        }
        by_figure.insert(name.into(), Value::Object(mixes));
    }
    for pass in passes {
        let strategies: Map<String, Value> = Strategy::ALL
            .iter()
            .map(|&s| {
                let m = pass.measured(s);
                let figures: Map<String, Value> = FIGURES
                    .iter()
                    .map(|&name| (name.into(), figure(m, s, name)))
                    .collect();
                (s.label().into(), Value::Object(figures))
            })
            .collect();
        by_mix.insert(pass.mix.label().into(), Value::Object(strategies));
    }
    by_figure.extend(by_mix);
    report.figures = Value::Object(by_figure);
}

/// How a strategy's detection went, for a goal's measured figure.
fn detection(s: Strategy, m: &Measured) -> String {
    let hung = match m.hung_within() {
        Some(within) => format!("{within}/{} hung", m.of(Role::Hung)),
        None => format!("{} hung (cannot see them)", m.hung_ms.len()),
    };
    format!(
        "{} caught {hung} and {}/{} vanished within its bounds",
        s.label(),
        m.vanished_within(),
        m.of(Role::Vanishing)
    )
}

/// The goals the issues set, reported met or not met; none fails the run.
pub fn goals(report: &mut lull_benches::BenchReport, passes: &[&Pass]) {
    let get = |mix: Mix, s: Strategy| {
        passes
            .iter()
            .find(|p| p.mix == mix)
            .and_then(|p| p.measured(s))
    };
    let not_measured = |a: Strategy, b: Strategy| {
        format!("not measured ({} or {} did not run)", a.label(), b.label())
    };
    // CPU per connection-hour of `a` against `b`, within `most`; with `detection`, both must
    // also have caught every dead peer they can see within their bounds.
    let mut cpu_goal = |mix: Mix, (a, b): (Strategy, Strategy), most: f64, with_detection: bool| {
        let name = format!(
            "{} CPU per connection-hour vs {}, {} mix{}",
            a.label(),
            b.label(),
            mix.label(),
            if with_detection {
                ", with every dead peer caught within its bound"
            } else {
                ""
            }
        );
        let target = format!("<= {most:.2}x");
        let Some((ma, mb)) = get(mix, a).zip(get(mix, b)) else {
            report.goal(&name, &target, not_measured(a, b), false);
            return;
        };
        let ratio = ma.per_conn_hour() / mb.per_conn_hour();
        let mut measured = format!(
            "{ratio:.2}x ({:.1} vs {:.1} ms)",
            ma.per_conn_hour(),
            mb.per_conn_hour()
        );
        let mut met = ratio <= most;
        if with_detection {
            measured += &format!("; {}; {}", detection(a, ma), detection(b, mb));
            met &= ma.caught_all_in_bounds() && mb.caught_all_in_bounds();
        }
        report.goal(&name, &target, measured, met);
    };
    for mix in passes.iter().map(|p| p.mix) {
        cpu_goal(mix, (Strategy::LullEbpf, Strategy::LullTcpinfo), 0.9, true);
    }
    cpu_goal(
        Mix::Standard,
        (Strategy::LullTiered, Strategy::Kernel),
        1.5,
        false,
    );
    cpu_goal(
        Mix::Standard,
        (Strategy::LullEbpf, Strategy::Tokio),
        0.8,
        true,
    );

    let (lull, tokio) = (Strategy::LullEbpf, Strategy::Tokio);
    let name = "lull-ebpf workers' CPU per probe vs tokio's, standard mix";
    match get(Mix::Standard, lull).zip(get(Mix::Standard, tokio)) {
        Some((ml, mt)) => match ml.worker_us_per_probe().zip(mt.worker_us_per_probe()) {
            Some((l, t)) => report.goal(
                name,
                "<= 0.70x",
                format!("{:.2}x ({l:.1} vs {t:.1} µs)", l / t),
                l / t <= 0.7,
            ),
            None => report.goal(name, "<= 0.70x", "no probes sent".into(), false),
        },
        None => report.goal(name, "<= 0.70x", not_measured(lull, tokio), false),
    }

    for pass in passes {
        let mix = pass.mix.label();
        let name = format!(
            "lull-tiered catches every hung peer within hung_after + interval (application \
             tier) and every vanished peer within the dead bound (transport tier), {mix} mix"
        );
        match pass.measured(Strategy::LullTiered) {
            Some(m) => {
                let tier = |t: [u64; 2]| {
                    format!(
                        "transport {}, application {}",
                        t[Tier::Transport.index()],
                        t[Tier::Application.index()]
                    )
                };
                let hung_bound = m.bounds.hung.unwrap_or_default().as_secs_f64();
                report.goal(
                    &name,
                    "all",
                    format!(
                        "hung {}/{} within {hung_bound:.1} s (by tier: {}), vanished {}/{} within \
                         {:.1} s (by tier: {})",
                        m.hung_within().unwrap_or(0),
                        m.of(Role::Hung),
                        tier(m.hung_tiers),
                        m.vanished_within(),
                        m.of(Role::Vanishing),
                        m.bounds.vanished.as_secs_f64(),
                        tier(m.vanished_tiers),
                    ),
                    m.caught_all_in_bounds(),
                );
            }
            None => report.goal(&name, "all", "not measured".into(), false),
        }
        let name = format!(
            "every strategy catches every dead peer it can see within its bound (kernel \
             keepalive: vanished only, no hung peer), {mix} mix"
        );
        let ran: Vec<(Strategy, &Measured)> = pass
            .outcomes
            .iter()
            .filter_map(|o| o.measured().map(|m| (o.strategy, m)))
            .collect();
        let missed: Vec<String> = ran
            .iter()
            .filter(|(_, m)| !m.caught_all_in_bounds())
            .map(|&(s, m)| detection(s, m))
            .collect();
        let measured = if missed.is_empty() {
            format!("all {} strategies that ran", ran.len())
        } else {
            format!("missed: {}", missed.join("; "))
        };
        let all_ran = ran.len() == pass.outcomes.len() && !ran.is_empty();
        report.goal(&name, "all", measured, missed.is_empty() && all_ran);
    }
}
