// Each subcommand registers itself on the root app; its callback does the work and throws
// std::exception with a user-facing message on bad input (main prints it and exits with status 1).
#pragma once
#include <CLI/CLI.hpp>

namespace muse::cli {

void add_prepare_command(CLI::App& app);
void add_train_command(CLI::App& app);
void add_eval_command(CLI::App& app);
void add_inspect_command(CLI::App& app);
void add_generate_command(CLI::App& app);
void add_chat_command(CLI::App& app);
void add_bench_command(CLI::App& app);
void add_diagnose_command(CLI::App& app);
void add_tokenizer_command(CLI::App& app);

}  // namespace muse::cli
