"""Reports of zqkernels: benchmark (and accuracy) JSON to Markdown/HTML with tables and plots.

`zq report out.json [more.json ...] [--accuracy acc.json] --out reports/<name>/` (see
`reports.cli`); the work is in `reports.report.build_report`.
"""
