// bindscope's monitoring mixin: alert and recording rules and Grafana dashboards.
//
// The rules come from mixin/rules.py (`python -m mixin` writes generated/); this file
// fills the `_config` into them, so a jsonnet user overrides any key of
// generated/config.json, e.g.
//   (import 'bindscope-mixin/mixin.libsonnet') + {
//     _config+:: { selector: 'job="node-bindscope"', loopbackOnlyFor: '10m' },
//   }
// With the default `_config` the output equals deploy/prometheus/bindscope.rules.yml and
// grafana/*.json.

// Every string of the templates is a Python-style format string over `_config`.
local fill(value, config) =
  if std.isString(value) then value % config
  else if std.isArray(value) then [fill(v, config) for v in value]
  else if std.isObject(value) then { [k]: fill(value[k], config) for k in std.objectFields(value) }
  else value;

{
  _config:: import 'generated/config.json',

  prometheusRules:: fill(import 'generated/rules.json', $._config),
  prometheusAlerts:: fill(import 'generated/alerts.json', $._config),

  grafanaDashboards:: {
    'bindscope-fleet.json': import 'generated/bindscope-fleet.json',
    'bindscope-host.json': import 'generated/bindscope-host.json',
  },
}
