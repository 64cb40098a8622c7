//! A scraped `/metrics` body, parsed enough for tests: every sample with its labels.

/// One sample line: `name{k="v",...} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Every sample of a scrape.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses the text format (OpenMetrics or Prometheus); panics on a line it cannot read.
    pub fn parse(text: &str) -> Self {
        let mut scrape = Scrape::default();
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            scrape.samples.push(parse_sample(line));
        }
        scrape
    }

    /// The value of the one sample named `name` whose labels include `labels`; panics when
    /// there is none or more than one.
    #[track_caller]
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self.matching(name, labels).collect();
        assert_eq!(
            found.len(),
            1,
            "{name}{labels:?}: {} samples match: {found:?}",
            found.len()
        );
        found[0].value
    }

    /// The sum of the samples named `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
    }
}

fn parse_sample(line: &str) -> Sample {
    let (series, value) = line.rsplit_once(' ').expect("a sample: `series value`");
    let value: f64 = value
        .parse()
        .unwrap_or_else(|_| panic!("a value in {line:?}"));
    let (name, labels) = match series.split_once('{') {
        None => (series, Vec::new()),
        Some((name, rest)) => {
            let body = rest.strip_suffix('}').expect("labels end with }");
            let mut labels = Vec::new();
            // Values here never hold `",`; enough for our own output.
            for pair in body.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                labels.push((k.to_owned(), v.trim_end_matches('"').to_owned()));
            }
            (name, labels)
        }
    };
    Sample {
        name: name.to_owned(),
        labels,
        value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_with_and_without_labels() {
        let s = Scrape::parse(
            "# TYPE a counter\na_total{app=\"web\",direction=\"in\"} 12\nb 3.5\n# EOF\n",
        );
        assert_eq!(s.value("a_total", &[("app", "web")]), 12.0);
        assert_eq!(s.value("b", &[]), 3.5);
        assert_eq!(s.sum("a_total", &[("direction", "out")]), 0.0);
    }
}
