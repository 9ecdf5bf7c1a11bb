// The no-op job of `sluice bench jobs --executor command`: reads the job from stdin,
// answers null (the command executor's contract at its cheapest).
#include <cstdio>

int main() {
    char buffer[4096];
    while (std::fread(buffer, 1, sizeof buffer, stdin) == sizeof buffer) {
    }
    std::puts("null");
    return 0;
}
