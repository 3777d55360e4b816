// Keeps the core library non-empty before the other core files land.
namespace ctalign { const char* core_version() { return "0.1.0"; } }
