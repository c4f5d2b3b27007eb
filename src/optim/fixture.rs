//! Reads fixture.txt (written by scripts/reference/optim_fixture.py from torch 2.11).

/// The rows of `## name`, each a list of numbers.
pub fn section(name: &str) -> Vec<Vec<f64>> {
    let text = include_str!("fixture.txt");
    let mut rows = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            if inside {
                break;
            }
            inside = h.trim() == name;
            continue;
        }
        if inside && !line.trim().is_empty() {
            rows.push(line.split_whitespace().map(|x| x.parse().expect("fixture number")).collect());
        }
    }
    assert!(!rows.is_empty(), "fixture section `{name}` missing: regenerate with scripts/reference/optim_fixture.py");
    rows
}
