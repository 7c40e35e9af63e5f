"""apilane.testing.chart's pure parts: splitting helm's output by template, comparing objects
field by field, and turning the rendered PrometheusRule into the plain rules file."""

from __future__ import annotations

import pytest
import yaml

from apilane.testing import chart

pytestmark = [pytest.mark.unit]

HELM_OUTPUT = """---
# Source: apilane/templates/a.yaml
# about a
kind: ConfigMap
metadata: {name: one, namespace: ns}
---
# Source: apilane/templates/b.yaml
kind: ClusterRole
metadata: {name: two}
---
# Source: apilane/templates/a.yaml
kind: Deployment
metadata: {name: three, namespace: ns}
"""


def test_rendered_sources_groups_documents_by_template_in_output_order() -> None:
    sources = chart.rendered_sources(HELM_OUTPUT)
    assert list(sources) == ["templates/a.yaml", "templates/b.yaml"]
    first, second = sources["templates/a.yaml"]
    assert first.startswith("# about a\nkind: ConfigMap")
    assert second == "kind: Deployment\nmetadata: {name: three, namespace: ns}\n"
    assert "# Source" not in "".join(sources["templates/b.yaml"])


def test_text_before_the_first_document_is_refused() -> None:
    with pytest.raises(chart.ChartError, match="before the first document"):
        chart.rendered_sources("kind: Stray\n" + HELM_OUTPUT)


def test_objects_are_keyed_by_kind_namespace_and_name_once() -> None:
    docs = chart.documents(HELM_OUTPUT)
    assert set(chart.by_key(docs)) == {
        ("ConfigMap", "ns", "one"),
        ("ClusterRole", "", "two"),
        ("Deployment", "ns", "three"),
    }
    with pytest.raises(chart.ChartError, match="ConfigMap/ns/one is defined twice"):
        chart.by_key([*docs, docs[0]])


def test_differences_name_each_field_path() -> None:
    first = {"spec": {"replicas": 2, "env": [{"name": "A", "value": "1"}], "gone": True}}
    second = {"spec": {"replicas": 3, "env": [{"name": "A", "value": "2"}, {"name": "B"}]}}
    assert chart.differences(first, second) == [
        "spec.env[0].value: '1' != '2'",
        "spec.env[1]: only in the second ({'name': 'B'})",
        "spec.gone: only in the first (True)",
        "spec.replicas: 2 != 3",
    ]
    assert chart.differences(first, first) == []


def test_compare_objects_reports_missing_objects_and_fields_under_their_names() -> None:
    key = ("ConfigMap", "ns", "one")
    first = {key: {"data": {"A": "1"}}, ("Secret", "ns", "x"): {}}
    second = {key: {"data": {"A": "2"}}, ("ClusterRole", "", "y"): {}}
    assert chart.compare_objects(first, second, names=("deploy/", "the chart")) == [
        "ClusterRole/y: only in the chart",
        "ConfigMap/ns/one: data.A: '1' != '2'",
        "Secret/ns/x: only in deploy/",
    ]


RULE_DOCUMENT = """# about the rule
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: apilane
spec:
  groups:
    - name: g
      rules:
        # why this alert
        - alert: A
          expr: |
            up == 0
"""


def test_the_rules_file_is_the_spec_with_its_comments() -> None:
    text = chart.rules_file_text(RULE_DOCUMENT)
    assert text.startswith("groups:\n  - name: g\n")
    assert "      # why this alert\n" in text
    assert yaml.safe_load(text) == yaml.safe_load(RULE_DOCUMENT)["spec"]
    with pytest.raises(chart.ChartError, match="no spec"):
        chart.rules_file_text("kind: PrometheusRule\n")
