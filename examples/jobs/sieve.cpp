// A job for Sluice's command executor: counts the primes up to a limit (a sieve of
// Eratosthenes), reporting its progress as it goes.
//
// The contract (README, "Job executors"): the job comes as one JSON document on stdin,
// the result goes as one JSON document to stdout, progress goes as JSON lines to stderr
// ({"progress": 0.4, "message": "..."}), any other stderr line is the job's log; exit 0
// completes the job, 75 asks for a retry, anything else fails it.
//
// Payload fields (all optional):
//   limit        count the primes up to this (default 1000000, at most 2000000000)
//   allocate_mb  allocate and touch this many MiB first (to try a memory limit)
//   sleep_s      sleep this long first, with a child process sleeping as long (to try a
//                timeout or a cancel: both must end)
//   pid_file     write the child's pid here (with sleep_s)
//   stdout_mb    write this many MiB of spaces to stdout before the result
//   exit         exit with this status before doing anything else
//
// The document is Sluice's own, so a lookup of a number after its key is all the parsing
// this example needs.
#include <unistd.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <iterator>
#include <new>
#include <string>
#include <vector>

namespace {

// The number after "key": in the payload object, or `fallback` when it is not there.
double number(const std::string& doc, const std::string& key, double fallback) {
    const std::size_t payload = doc.find("\"payload\":");
    if (payload == std::string::npos) return fallback;
    const std::size_t at = doc.find("\"" + key + "\":", payload);
    if (at == std::string::npos) return fallback;
    const char* start = doc.c_str() + at + key.size() + 3;
    char* end = nullptr;
    const double value = std::strtod(start, &end);
    return end == start ? fallback : value;
}

// The string after "key": in the payload object, or "" when it is not there.
std::string text(const std::string& doc, const std::string& key) {
    const std::size_t payload = doc.find("\"payload\":");
    if (payload == std::string::npos) return "";
    const std::size_t at = doc.find("\"" + key + "\":\"", payload);
    if (at == std::string::npos) return "";
    const std::size_t start = at + key.size() + 4;
    const std::size_t end = doc.find('"', start);
    return end == std::string::npos ? "" : doc.substr(start, end - start);
}

void progress(double fraction, const std::string& message) {
    std::fprintf(stderr, "{\"progress\": %.3f, \"message\": \"%s\"}\n", fraction, message.c_str());
    std::fflush(stderr);
}

}  // namespace

int main() {
    const std::string doc((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    if (doc.empty()) {
        std::fprintf(stderr, "no job on stdin\n");
        return 2;
    }
    const double exit_status = number(doc, "exit", -1);
    if (exit_status >= 0) {
        std::fprintf(stderr, "exiting with %d as the payload asks\n", static_cast<int>(exit_status));
        return static_cast<int>(exit_status);
    }

    const double allocate_mb = number(doc, "allocate_mb", 0);
    if (allocate_mb > 0) {
        try {
            std::vector<char> block(static_cast<std::size_t>(allocate_mb * 1024 * 1024));
            std::memset(block.data(), 1, block.size());
            std::fprintf(stderr, "allocated %.0f MiB\n", allocate_mb);
        } catch (const std::bad_alloc&) {
            std::fprintf(stderr, "out of memory: could not allocate %.0f MiB\n", allocate_mb);
            return 3;
        }
    }

    const double sleep_s = number(doc, "sleep_s", 0);
    if (sleep_s > 0) {
        const pid_t child = fork();
        if (child == 0) {
            // The grandchild of the executor: it must end with the job.
            usleep(static_cast<useconds_t>(sleep_s * 1e6));
            _exit(0);
        }
        const std::string pid_file = text(doc, "pid_file");
        if (!pid_file.empty()) {
            if (FILE* out = std::fopen(pid_file.c_str(), "w")) {
                std::fprintf(out, "%d\n", static_cast<int>(child));
                std::fclose(out);
            }
        }
        progress(0.0, "sleeping");
        usleep(static_cast<useconds_t>(sleep_s * 1e6));
        waitpid(child, nullptr, 0);
    }

    const double stdout_mb = number(doc, "stdout_mb", 0);
    if (stdout_mb > 0) {
        const std::string spaces(1024 * 1024, ' ');
        for (int i = 0; i < static_cast<int>(stdout_mb); ++i) std::fwrite(spaces.data(), 1, spaces.size(), stdout);
    }

    const double limit_value = number(doc, "limit", 1000000);
    if (limit_value < 2 || limit_value > 2e9) {
        std::fprintf(stderr, "limit must be 2 to 2000000000\n");
        return 2;
    }
    const auto limit = static_cast<std::size_t>(limit_value);
    std::vector<bool> composite(limit + 1, false);
    const auto root = static_cast<std::size_t>(std::sqrt(static_cast<double>(limit)));
    int reported = 0;
    for (std::size_t p = 2; p <= root; ++p) {
        if (composite[p]) continue;
        for (std::size_t m = p * p; m <= limit; m += p) composite[m] = true;
        const int tenth = static_cast<int>(10.0 * static_cast<double>(p) / static_cast<double>(root));
        if (tenth > reported) {
            reported = tenth;
            progress(tenth / 10.0, "sieved to " + std::to_string(p));
        }
    }
    std::size_t count = 0;
    std::size_t largest = 0;
    for (std::size_t n = 2; n <= limit; ++n) {
        if (!composite[n]) {
            ++count;
            largest = n;
        }
    }
    progress(1.0, "counted");
    std::printf("{\"limit\": %zu, \"primes\": %zu, \"largest\": %zu}\n", limit, count, largest);
    return 0;
}
