"""Speed, scale and overhead benchmarks (issue 8); each module is one command, see RESULTS.md."""
