//! The monitoring examples: the alerting rules (examples/prometheus/) pass promtool's check
//! and their unit tests, which fail when a threshold or a metric name is wrong; every PromQL
//! expression of the rules and of the Grafana dashboard (examples/grafana/) parses and names
//! only series the broker exposes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use token_broker::metrics::Metrics;
use yaml_rust2::{Yaml, YamlEmitter, YamlLoader};

use crate::support::{self, LeafSpec, Setup};

const ALERTS: &str = "examples/prometheus/alerts.yml";
const ALERTS_TEST: &str = "examples/prometheus/alerts_test.yml";
const DASHBOARD: &str = "examples/grafana/token-broker.json";

/// Series the expressions may name besides the broker's: Prometheus' own scrape health.
const PROMETHEUS_SERIES: &[&str] = &["up"];

/// What Grafana puts in place of the dashboard's variables before it sends a query.
const GRAFANA_VARIABLES: &[(&str, &str)] = &[
    ("$__rate_interval", "5m"),
    ("$__interval", "1m"),
    ("$__range", "6h"),
    ("$instance", "broker-1:9090"),
];

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Yaml {
    YamlLoader::load_from_str(&read(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .remove(0)
}

fn emit(doc: &Yaml) -> String {
    let mut out = String::new();
    YamlEmitter::new(&mut out).dump(doc).unwrap();
    out
}

fn promtool(args: &[&str], dir: &Path) -> Output {
    Command::new(support::require_tool("promtool", "prometheus"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn printed(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The alerting rules of the rules file, each a YAML mapping.
fn alert_rules(rules: &Yaml) -> Vec<&Yaml> {
    let groups = rules["groups"].as_vec().expect("a rules file has groups");
    let rules: Vec<&Yaml> = groups
        .iter()
        .flat_map(|group| group["rules"].as_vec().expect("a group has rules"))
        .filter(|rule| !rule["alert"].is_badvalue())
        .collect();
    assert!(!rules.is_empty(), "{ALERTS} has no alert");
    rules
}

fn text<'a>(node: &'a Yaml, key: &str) -> &'a str {
    node[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} missing or not a string in {node:?}"))
}

/// Words of PromQL that are not series even where no `(` follows: binary operators and
/// modifiers, and aggregations (followed by `by`/`without` as often as by `(`).
#[rustfmt::skip]
const PROMQL_WORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "on", "ignoring", "group_left", "group_right",
    "by", "without", "atan2", "inf", "nan", "sum", "min", "max", "avg", "group", "stddev",
    "stdvar", "count", "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio",
];

/// A piece of PromQL outside strings, label matchers `{}` and ranges `[]` (skipped whole).
#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    /// A number or a duration (`15m`, `1e3`).
    Number(std::ops::Range<usize>),
    Open,
    Close,
}

fn tokens(expr: &str) -> Vec<Token> {
    let bytes = expr.as_bytes();
    let word_byte = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let skip_to = |mut i: usize, close: u8| {
        while i < bytes.len() && bytes[i] != close {
            i += if bytes[i] == b'\\' { 2 } else { 1 };
        }
        i + 1
    };
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        match bytes[i] {
            quote @ (b'"' | b'\'' | b'`') => i = skip_to(i + 1, quote),
            b'{' => i = skip_to(i + 1, b'}'),
            b'[' => i = skip_to(i + 1, b']'),
            b'(' | b')' => {
                found.push(if bytes[i] == b'(' {
                    Token::Open
                } else {
                    Token::Close
                });
                i += 1;
            }
            b'0'..=b'9' | b'.' => {
                while i < bytes.len() && (word_byte(bytes[i]) || bytes[i] == b'.') {
                    i += 1;
                }
                found.push(Token::Number(start..i));
            }
            b if word_byte(b) => {
                while i < bytes.len() && word_byte(bytes[i]) {
                    i += 1;
                }
                found.push(Token::Word(expr[start..i].to_owned()));
            }
            _ => i += 1,
        }
    }
    found
}

/// The series names an expression selects: words that are neither PromQL words, nor
/// functions (followed by `(`), nor in the label list of `by`, `without`, `on`, `ignoring`
/// or `group_*`. Whether the expression parses at all is promtool's verdict.
fn selected_series(expr: &str) -> BTreeSet<String> {
    assert!(!expr.contains("__name__"), "{expr}: select series by name");
    let tokens = tokens(expr);
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < tokens.len() {
        if let Token::Word(word) = &tokens[i] {
            let call = tokens.get(i + 1) == Some(&Token::Open);
            let label_list = matches!(
                word.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            );
            if label_list && call {
                while i < tokens.len() && tokens[i] != Token::Close {
                    i += 1;
                }
            } else if !call && !PROMQL_WORDS.contains(&word.as_str()) {
                names.insert(word.clone());
            }
        }
        i += 1;
    }
    names
}

#[test]
fn series_are_told_from_functions_labels_and_keywords() {
    let expr = r#"sum by (instance, reason) (rate(a_total{reason=~"x|y", job="up"}[15m]))
        > 3 * sum without (le) (b offset 15m) and on (instance) group_left (cause) c
        unless ignoring(result) absent(up{job='token-broker'}) or histogram_quantile(0.9,
        d_bucket) * 1e3 > bool time() - e:recorded"#;
    let expected = ["a_total", "b", "c", "d_bucket", "e:recorded", "up"];
    assert_eq!(selected_series(expr), expected.map(String::from).into());
}

/// The dashboard's queries with Grafana's variables replaced: (panel title, PromQL).
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn panels<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            panels(&panel["panels"], out);
        }
    }
    let mut all = Vec::new();
    panels(&dashboard["panels"], &mut all);
    let substitute = |expr: &str| {
        GRAFANA_VARIABLES
            .iter()
            .fold(expr.to_owned(), |e, (var, value)| e.replace(var, value))
    };
    let queries: Vec<(String, String)> = all
        .iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |target| {
                    let expr = target["expr"].as_str().expect("every target has an expr");
                    (title.clone(), substitute(expr))
                })
        })
        .collect();
    assert!(queries.len() > 10, "{DASHBOARD}: only {queries:?}");
    queries
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = repo_file("examples/prometheus");
    let check = promtool(&["check", "rules", "alerts.yml"], &dir);
    assert!(check.status.success(), "{}", printed(&check));
    let test = promtool(&["test", "rules", "alerts_test.yml"], &dir);
    assert!(test.status.success(), "{}", printed(&test));
}

/// Every alert waits (`for`), says how bad it is, and says what to do; its unit tests have
/// a case where it fires and one where it must not.
#[test]
fn every_alert_has_for_severity_runbook_and_cases_that_fire_and_that_do_not() {
    let rules = yaml(ALERTS);
    let tests = yaml(ALERTS_TEST);
    let cases: Vec<&Yaml> = tests["tests"]
        .as_vec()
        .expect("tests")
        .iter()
        .flat_map(|test| test["alert_rule_test"].as_vec().expect("alert_rule_test"))
        .collect();
    for rule in alert_rules(&rules) {
        let name = text(rule, "alert");
        assert!(!text(rule, "for").is_empty(), "{name}: no `for`");
        let severity = text(&rule["labels"], "severity");
        assert!(
            ["critical", "warning"].contains(&severity),
            "{name}: severity {severity}"
        );
        assert!(
            text(&rule["annotations"], "summary").len() > 20,
            "{name}: no summary"
        );
        // A description says what to do: a command, a config key or a file to change.
        let description = text(&rule["annotations"], "description");
        assert!(
            description.contains('`')
                || description.contains("server.")
                || description.contains('['),
            "{name}: its description names nothing to run or change: {description}"
        );
        let expected: Vec<usize> = cases
            .iter()
            .filter(|case| text(case, "alertname") == name)
            .map(|case| case["exp_alerts"].as_vec().map_or(0, Vec::len))
            .collect();
        assert!(
            expected.iter().any(|&n| n > 0),
            "{name}: no unit test in which it fires"
        );
        assert!(
            expected.contains(&0),
            "{name}: no unit test in which it must stay silent"
        );
    }
}

/// Where an expression's number literals are (durations such as `offset 15m` aside).
fn number_literals(expr: &str) -> Vec<std::ops::Range<usize>> {
    tokens(expr)
        .into_iter()
        .filter_map(|token| match token {
            Token::Number(range) if expr[range.clone()].parse::<f64>().is_ok() => Some(range),
            _ => None,
        })
        .collect()
}

/// `name` replaced where it stands as a whole identifier.
fn rename_series(expr: &str, name: &str, to: &str) -> String {
    let identifier =
        |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    let mut out = String::new();
    let mut copied = 0;
    for (at, _) in expr.match_indices(name) {
        let end = at + name.len();
        if !identifier(expr[..at].chars().last()) && !identifier(expr[end..].chars().next()) {
            out.push_str(&expr[copied..at]);
            out.push_str(to);
            copied = end;
        }
    }
    out.push_str(&expr[copied..]);
    out
}

/// Mutation testing of the rule unit tests: for every alert, each number in its expression
/// doubled or halved (zeros aside), and each series it selects renamed, must make
/// `promtool test rules` fail on that alert. So every threshold has a case on either side
/// within a factor of two, and every alert a case where it fires.
#[test]
fn a_wrong_threshold_or_metric_name_fails_the_alert_unit_tests() {
    let rules = yaml(ALERTS);
    let tests = yaml(ALERTS_TEST);
    let mut mutants = Vec::new();
    for rule in alert_rules(&rules) {
        let alert = text(rule, "alert");
        let expr = text(rule, "expr");
        let mutant = |change: String, expr: String| Mutant {
            alert: alert.into(),
            change,
            expr,
        };
        for range in number_literals(expr) {
            let value: f64 = expr[range.clone()].parse().unwrap();
            if value == 0.0 {
                continue;
            }
            for factor in [2.0, 0.5] {
                let (before, after) = (&expr[..range.start], &expr[range.end..]);
                let mutated = format!("{before}{}{after}", value * factor);
                mutants.push(mutant(format!("{value} × {factor}"), mutated));
            }
        }
        for series in selected_series(expr) {
            let mutated = rename_series(expr, &series, &format!("{series}_renamed"));
            assert_ne!(mutated, expr);
            mutants.push(mutant(format!("{series} renamed"), mutated));
        }
    }
    assert!(mutants.len() > 30, "{} mutants only", mutants.len());

    let dir = tempfile::tempdir().unwrap();
    // One promtool process per mutant; two at a time keep both cores busy.
    let survivors: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|worker| {
                let (mutants, rules, tests, dir) = (&mutants, &rules, &tests, dir.path());
                scope.spawn(move || {
                    (worker..mutants.len())
                        .step_by(2)
                        .filter_map(|i| mutants[i].survives(i, rules, tests, dir))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert!(
        survivors.is_empty(),
        "alert unit tests that still pass with a mutated rule (add a case next to the threshold):\n{}",
        survivors.join("\n")
    );
}

/// One alert with a changed expression.
struct Mutant {
    alert: String,
    change: String,
    expr: String,
}

impl Mutant {
    /// Runs the unit tests that evaluate this alert against the rules with this mutant;
    /// what promtool printed if they did not fail on the alert.
    fn survives(&self, id: usize, rules: &Yaml, tests: &Yaml, dir: &Path) -> Option<String> {
        let alert = Some(self.alert.as_str());
        let mut rules = rules.clone();
        for group in rules["groups"].as_mut_vec().unwrap() {
            for rule in group["rules"].as_mut_vec().unwrap() {
                if rule["alert"].as_str() == alert {
                    rule["expr"] = Yaml::String(self.expr.clone());
                }
            }
        }
        let mut tests = tests.clone();
        tests["tests"].as_mut_vec().unwrap().retain(|test| {
            test["alert_rule_test"]
                .as_vec()
                .unwrap()
                .iter()
                .any(|case| case["alertname"].as_str() == alert)
        });
        let rules_file = format!("rules-{id}.yml");
        tests["rule_files"] = Yaml::Array(vec![Yaml::String(rules_file.clone())]);
        std::fs::write(dir.join(&rules_file), emit(&rules)).unwrap();
        let test_file = format!("test-{id}.yml");
        std::fs::write(dir.join(&test_file), emit(&tests)).unwrap();
        let out = promtool(&["test", "rules", &test_file], dir);
        let failed_on_alert =
            !out.status.success() && printed(&out).contains(&format!("alertname: {},", self.alert));
        (!failed_on_alert).then(|| {
            let (alert, change, expr) = (&self.alert, &self.change, &self.expr);
            format!("{alert} with {change}: {expr}\n{}", printed(&out))
        })
    }
}

/// The series names the other tests allow are exactly what a running broker exposes: every
/// sample of its `/metrics` is among them (histograms through their `_bucket`, `_sum` and
/// `_count` series).
#[tokio::test(flavor = "multi_thread")]
async fn the_allowed_series_are_those_a_running_broker_exposes() {
    let setup = Setup::new();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("monitored"));
    let broker = setup.start().await;
    let (status, _) = broker
        .token(Some(&leaf), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 200);
    let exposed: BTreeSet<String> = broker
        .metrics()
        .await
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| line.split(['{', ' ']).next().unwrap().to_owned())
        .collect();
    broker.stop().await;
    let allowed: BTreeSet<String> = Metrics::new().series_names().into_iter().collect();
    for sample in [
        "token_broker_request_duration_seconds_bucket",
        "token_broker_tokens_issued_total",
        "token_broker_open_connections",
    ] {
        assert!(exposed.contains(sample), "{sample} not in {exposed:?}");
    }
    let unknown: Vec<_> = exposed.difference(&allowed).collect();
    assert!(
        unknown.is_empty(),
        "exposed but not in series_names: {unknown:?}"
    );
    assert!(!allowed.contains("token_broker_request_duration_seconds"));
}

#[test]
fn dashboard_and_alert_expressions_parse_and_name_only_exposed_series() {
    let mut allowed: BTreeSet<String> = Metrics::new().series_names().into_iter().collect();
    allowed.extend(PROMETHEUS_SERIES.iter().map(|s| s.to_string()));

    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    let mut expressions: Vec<(String, String)> = dashboard_queries(&dashboard)
        .into_iter()
        .map(|(title, expr)| (format!("{DASHBOARD} panel {title:?}"), expr))
        .collect();
    let rules = yaml(ALERTS);
    for rule in alert_rules(&rules) {
        expressions.push((
            format!("{ALERTS} {}", text(rule, "alert")),
            text(rule, "expr").into(),
        ));
    }

    let mut problems = Vec::new();
    let mut named = BTreeSet::new();
    for (place, expr) in &expressions {
        let series = selected_series(expr);
        if series.is_empty() {
            problems.push(format!("{place}: selects no series: {expr}"));
        }
        for name in series {
            if !allowed.contains(&name) {
                problems.push(format!("{place}: unknown metric {name}: {expr}"));
            }
            named.insert(name);
        }
    }
    // The instance variable's query is Grafana's label_values(metric, label), not PromQL.
    let variable = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "instance")
        .expect("an instance variable");
    let query = variable["definition"].as_str().unwrap();
    let metric = query
        .strip_prefix("label_values(")
        .and_then(|rest| rest.split(',').next())
        .expect("label_values(metric, instance)");
    if !allowed.contains(metric.trim()) {
        problems.push(format!(
            "{DASHBOARD} variable instance: unknown metric {metric}"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(named.len() > 15, "{named:?}");

    // Prometheus' own parser agrees: every dashboard query as a recording rule.
    let dir = tempfile::tempdir().unwrap();
    let rules: String = dashboard_queries(&dashboard)
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| {
            format!(
                "      - record: dashboard:query_{i}\n        expr: {}\n",
                serde_json::to_string(expr).unwrap()
            )
        })
        .collect();
    std::fs::write(
        dir.path().join("dashboard.yml"),
        format!("groups:\n  - name: dashboard\n    rules:\n{rules}"),
    )
    .unwrap();
    let out = promtool(&["check", "rules", "dashboard.yml"], dir.path());
    assert!(out.status.success(), "{}", printed(&out));
}

/// Importable as it is: the data source is chosen at import (a `datasource` variable every
/// panel and query uses), and every query follows the `instance` variable.
#[test]
fn dashboard_uses_the_datasource_and_instance_variables() {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    assert_eq!(dashboard["uid"], "token-broker");
    let names: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, ["datasource", "instance"]);
    let source = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"], source, "panel {}", panel["title"]);
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"], source, "panel {}", panel["title"]);
            let expr = target["expr"].as_str().unwrap();
            assert!(
                expr.contains(r#"instance=~"$instance""#),
                "panel {}: {expr} ignores the instance variable",
                panel["title"]
            );
        }
    }
}
