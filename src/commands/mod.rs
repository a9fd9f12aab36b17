//! One module per subcommand: glue from arguments to library calls and a report.
